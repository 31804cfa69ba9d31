"""Error responses become typed errors chosen by the problem's code, else by status, never by message text."""

from __future__ import annotations

import pytest

from ragadapt_client import (
    APIResponseValidationError,
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    GatewayTimeoutError,
    InternalServerError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RagadaptError,
    RateLimitError,
    ServiceUnavailableError,
    UnprocessableEntityError,
)

from scripted import Reply

NO_RETRY = {"max_retries": 0}


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, BadRequestError),
        (401, AuthenticationError),
        (403, PermissionDeniedError),
        (404, NotFoundError),
        (409, ConflictError),
        (413, PayloadTooLargeError),
        (422, UnprocessableEntityError),
        (429, RateLimitError),
        (500, InternalServerError),
        (503, ServiceUnavailableError),
        (504, GatewayTimeoutError),
    ],
)
def test_each_status_has_its_class_and_carries_the_problem(scripted, using, status, cls):
    scripted.script = [Reply.problem(status, "some_new_code", "what went wrong")]
    with pytest.raises(cls) as caught:
        using(scripted.url, lambda client: client.domains.list(), **NO_RETRY)
    error = caught.value
    assert isinstance(error, APIStatusError) and isinstance(error, RagadaptError)
    assert (error.status, error.code, error.detail) == (status, "some_new_code", "what went wrong")
    assert error.request_id == "server-side-id"
    assert error.type == "https://ragadapt.dev/problems/some_new_code"
    assert "some_new_code" in str(error) and "server-side-id" in str(error)


def test_a_known_code_decides_the_class_whatever_the_text_says(scripted, using):
    scripted.script = [Reply.problem(503, "index_not_ready", "domain 'covid' not found in any index")]
    with pytest.raises(ServiceUnavailableError) as caught:
        using(scripted.url, lambda client: client.domains.get("covid"), **NO_RETRY)
    assert not isinstance(caught.value, NotFoundError)
    assert caught.value.code == "index_not_ready"


def test_the_code_is_taken_from_the_problem_type_when_absent(scripted, using):
    problem = {"type": "https://ragadapt.dev/problems/domain_not_found", "status": 404, "title": "Not found"}
    scripted.script = [Reply(404, problem, {"Content-Type": "application/problem+json"})]
    with pytest.raises(NotFoundError) as caught:
        using(scripted.url, lambda client: client.domains.get("nws"), **NO_RETRY)
    assert caught.value.code == "domain_not_found"


def test_a_body_that_is_no_problem_still_gives_a_typed_error(scripted, using):
    scripted.script = [
        Reply(502, b"<html>bad gateway</html>", {"Content-Type": "text/html", "X-Request-ID": "proxy-id"})
    ]
    with pytest.raises(APIStatusError) as caught:
        using(scripted.url, lambda client: client.domains.list(), **NO_RETRY)
    error = caught.value
    assert type(error) is APIStatusError
    assert error.status == 502 and error.code is None
    assert error.detail == "<html>bad gateway</html>"
    assert error.request_id == "proxy-id"


def test_without_any_id_from_the_server_the_error_has_the_one_sent(scripted, using):
    scripted.script = [Reply(418, b"", {"Content-Type": "text/plain"})]
    with pytest.raises(APIStatusError) as caught:
        using(scripted.url, lambda client: client.health(), **NO_RETRY)
    assert caught.value.status == 418
    assert caught.value.request_id == scripted.received[0].headers["x-request-id"]


def test_a_success_body_that_breaks_the_contract_is_reported(scripted, using):
    scripted.script = [Reply(200, {"domains": [{"description": "no name"}]})]
    with pytest.raises(APIResponseValidationError) as caught:
        using(scripted.url, lambda client: client.domains.list(), **NO_RETRY)
    assert caught.value.code == "invalid_response" and "GET /domains" in str(caught.value)


def test_retry_after_is_exposed_when_retries_run_out(scripted, using):
    scripted.script = [Reply.problem(503, "overloaded", **{"Retry-After": "7"})]
    with pytest.raises(ServiceUnavailableError) as caught:
        using(scripted.url, lambda client: client.ask("covid", "q"), **NO_RETRY)
    assert caught.value.retry_after == 7.0

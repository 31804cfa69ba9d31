"""Retries against a real HTTP server on loopback: what is retried, how long the client waits, and what never
is (an admin POST that reached the server)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from ragadapt_client import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    ConflictError,
    InternalServerError,
    RetryPolicy,
    ServiceUnavailableError,
)
from ragadapt_client.errors import parse_retry_after

from scripted import Reply, ScriptedServer

RUN = {"id": "r1", "domain": "covid", "mode": "end2end", "state": "queued", "step": 0, "total_steps": 4}


def test_503_then_success_waits_retry_after_and_keeps_the_request_id(scripted, using):
    scripted.script = [Reply.problem(503, "overloaded", **{"Retry-After": "1"})]
    started = time.monotonic()
    health = using(scripted.url, lambda client: client.health())
    elapsed = time.monotonic() - started

    assert health.status == "alive"
    assert scripted.paths() == ["GET /healthz", "GET /healthz"]
    # Backoff alone is at most 0.02 s here: only Retry-After explains a one-second wait.
    assert scripted.received[1].time - scripted.received[0].time >= 0.95
    assert elapsed >= 0.95
    ids = {r.headers["x-request-id"] for r in scripted.received}
    assert len(ids) == 1 and ids.pop()


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_transient_statuses_are_retried(scripted, using, status):
    scripted.script = [Reply(status, {"status": status})]
    assert using(scripted.url, lambda client: client.health()).status == "alive"
    assert len(scripted.received) == 2


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 413, 422])
def test_client_errors_are_not_retried(scripted, using, status):
    scripted.script = [Reply.problem(status, "some_code")]
    with pytest.raises(APIStatusError) as caught:
        using(scripted.url, lambda client: client.domains.get("covid"))
    assert caught.value.status == status
    assert len(scripted.received) == 1


def test_gives_up_after_max_retries_with_the_last_error(scripted, using):
    scripted.respond = lambda received: Reply.problem(500, "internal", "boom")
    policy = RetryPolicy(max_retries=3, initial_backoff=0.01, max_backoff=0.02)
    with pytest.raises(InternalServerError) as caught:
        using(scripted.url, lambda client: client.domains.list(), retry=policy)
    assert len(scripted.received) == 4
    assert caught.value.code == "internal" and caught.value.detail == "boom"


def test_backoff_grows_exponentially_within_its_cap(scripted, using):
    scripted.respond = lambda received: Reply(503, b"busy", {"Content-Type": "text/plain"})
    policy = RetryPolicy(max_retries=4, initial_backoff=0.05, max_backoff=0.4)
    with pytest.raises(ServiceUnavailableError):
        using(scripted.url, lambda client: client.health(), retry=policy)
    gaps = [b.time - a.time for a, b in zip(scripted.received, scripted.received[1:], strict=False)]
    assert len(gaps) == 4
    # Full jitter: each gap lies in [0, min(cap, 0.05 * 2**n)] plus the round trip.
    for n, gap in enumerate(gaps):
        assert gap <= min(0.4, 0.05 * 2**n) + 0.1


def test_max_retries_zero_sends_once(scripted, using):
    scripted.script = [Reply(503, {})]
    with pytest.raises(ServiceUnavailableError):
        using(scripted.url, lambda client: client.health(), max_retries=0)
    assert len(scripted.received) == 1


def test_ask_is_retried_although_it_is_a_post(scripted, using):
    answer = {
        "answer": "five days",
        "domain": "covid",
        "adapter_version": None,
        "index_version": "i1",
        "passages": [],
        "timings": {"queue": 0.0, "embed": 0.01, "search": 0.0, "generate": 0.5},
    }
    scripted.script = [Reply.problem(503, "index_not_ready", **{"Retry-After": "0"}), Reply(200, answer)]
    result = using(scripted.url, lambda client: client.ask("covid", "incubation?"))
    assert result.answer == "five days" and result.adapter_version is None
    assert scripted.paths() == ["POST /ask?domain=covid"] * 2


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_admin_post_that_reached_the_server_is_never_retried(scripted, using, status):
    scripted.respond = lambda received: Reply.problem(status, "overloaded", **{"Retry-After": "0"})
    with pytest.raises(APIStatusError) as caught:
        using(scripted.url, lambda client: client.runs.create("covid"), admin_token="t")
    assert caught.value.status == status
    assert scripted.paths() == ["POST /admin/adapt"]


def test_admin_post_is_not_retried_after_a_read_timeout(scripted, using):
    scripted.script = [Reply(202, RUN, delay=0.6)]
    with pytest.raises(APITimeoutError):
        using(scripted.url, lambda client: client.runs.create("covid"), admin_token="t", timeout=0.2)
    time.sleep(0.5)  # a retry would have arrived by now
    assert scripted.paths() == ["POST /admin/adapt"]


def test_get_is_retried_after_a_read_timeout(scripted, using):
    scripted.script = [Reply(200, {"status": "alive"}, delay=0.6)]
    assert using(scripted.url, lambda client: client.health(), timeout=0.2).status == "alive"
    assert len(scripted.received) == 2


def test_admin_post_is_retried_when_the_connection_was_refused(using):
    """Nothing listens yet: the request never left, so even a run creation may be sent again."""
    server = ScriptedServer(listening=False)
    server.respond = lambda received: Reply(202, RUN)

    def start_later() -> None:
        time.sleep(0.4)
        server.listen()

    threading.Thread(target=start_later, daemon=True).start()
    policy = RetryPolicy(max_retries=8, initial_backoff=0.2, max_backoff=0.4)
    try:
        run = using(server.url, lambda client: client.runs.create("covid"), admin_token="t", retry=policy)
        assert run.id == "r1"
        assert server.paths() == ["POST /admin/adapt"]
    finally:
        server.__exit__(None, None, None)


def test_connection_refused_raises_api_connection_error_after_retries(using):
    # bound, never listening: refuses every connection
    with ScriptedServer(listening=False) as closed, pytest.raises(APIConnectionError) as caught:
        using(closed.url, lambda client: client.health())
    assert not isinstance(caught.value, APITimeoutError)
    assert isinstance(caught.value.__cause__, httpx.ConnectError)
    assert caught.value.request_id


def test_readiness_probe_reports_503_at_once(scripted, using):
    scripted.script = [Reply.problem(503, "not_ready", **{"Retry-After": "5"})]
    started = time.monotonic()
    with pytest.raises(ServiceUnavailableError) as caught:
        using(scripted.url, lambda client: client.ready())
    assert time.monotonic() - started < 2
    assert caught.value.code == "not_ready" and caught.value.retry_after == 5
    assert len(scripted.received) == 1


def test_version_conflict_is_not_retried(scripted, using):
    scripted.respond = lambda received: Reply.problem(409, "version_conflict", "a concurrent promotion won")
    with pytest.raises(ConflictError) as caught:
        using(
            scripted.url,
            lambda client: client.domains.promote("covid", "v2", expected_etag="e1"),
            admin_token="t",
        )
    assert caught.value.code == "version_conflict"
    assert len(scripted.received) == 1


def test_retry_after_parses_seconds_and_http_dates():
    from email.utils import formatdate

    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 0 ") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    in_ten = parse_retry_after(formatdate(time.time() + 10, usegmt=True))
    assert in_ten is not None and 8.0 <= in_ten <= 10.0
    assert parse_retry_after(formatdate(time.time() - 60, usegmt=True)) == 0.0


def test_retry_after_is_capped_by_the_policy():
    policy = RetryPolicy(max_retry_after=2.0)
    assert policy.delay(0, 3600.0) == 2.0
    assert policy.delay(0, 0.5) == 0.5

"""Every error becomes an RFC 9457 problem document with a stable `code` and the request's id.

Typed errors of every package (anything with a string `code` and an int `status`) map one to one; Litestar's
own HTTP errors (unknown route, wrong method, validation, malformed JSON, body too large) get codes of their
own; any other exception is a 500 `internal_error` whose detail says nothing about internals (the log has the
traceback).
"""

from __future__ import annotations

import logging
import re
import uuid
from http import HTTPStatus
from typing import Any

from litestar import Request, Response
from litestar.exceptions import (
    HTTPException,
    MethodNotAllowedException,
    NotAuthorizedException,
    NotFoundException,
    ValidationException,
)
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import Operation
from litestar.types import Message, Scope

from .schemas import Problem

log = logging.getLogger(__name__)

PROBLEM_TYPE = "https://ragadapt.dev/problems/"
MEDIA_TYPE = "application/problem+json"
REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # matched whole
_TOO_LARGE_HINTS = {
    "/admin/adapt": "; send large training sets as train.uri (a store key) or as the domain's QA set "
    "(the qa file of POST /admin/domains)",
}


def request_id(scope: Scope) -> str:
    """The request's id: the client's `X-Request-ID` when it is sane, else a fresh one; stable per request."""
    state = scope.setdefault("state", {})
    found = state.get("request_id")
    if found is None:
        given = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"x-request-id"), None)
        found = given if given is not None and _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        state["request_id"] = found
    return found


async def add_request_id(message: Message, scope: Scope) -> None:
    """before_send hook: every response carries `X-Request-ID`, including Litestar's own error responses."""
    if message["type"] == "http.response.start":
        headers = list(message.get("headers", []))
        if not any(k.lower() == b"x-request-id" for k, _ in headers):
            headers.append((b"x-request-id", request_id(scope).encode("latin-1")))
            message["headers"] = headers


def problem(
    request: Request,
    status: int,
    code: str,
    detail: str,
    *,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> Response:
    title = code.replace("_", " ").capitalize()
    body = {
        "type": PROBLEM_TYPE + code,
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
        "request_id": request_id(request.scope),
        **extra,
    }
    return Response(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


def handle_exception(request: Request, exc: Exception) -> Response:
    """The one exception handler of the app."""
    code, status = getattr(exc, "code", None), getattr(exc, "status", None)
    if isinstance(code, str) and isinstance(status, int) and not isinstance(exc, HTTPException):
        return _typed(request, exc, code, status)
    if isinstance(exc, HTTPException):
        return _litestar(request, exc)
    log.error(
        "unhandled error on %s %s (request %s)",
        request.method,
        request.url.path,
        request_id(request.scope),
        exc_info=exc,
    )
    return problem(
        request,
        500,
        "internal_error",
        "the server failed to handle this request; "
        f"quote request id {request_id(request.scope)} when reporting it",
    )


def _typed(request: Request, exc: Exception, code: str, status: int) -> Response:
    headers = {}
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is None and status == 503:
        retry_after = 5
    if retry_after is not None:
        headers["Retry-After"] = str(int(retry_after))
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    extra = {}
    line = getattr(exc, "line", None)  # invalid_passages, invalid_qa: the JSONL line at fault
    if isinstance(line, int):
        extra["line"] = line
    if status >= 500 and status not in (503, 504):
        log.error("request %s failed with %s: %s", request_id(request.scope), code, exc)
    return problem(request, status, code, str(exc) or HTTPStatus(status).phrase, headers=headers, **extra)


def _litestar(request: Request, exc: HTTPException) -> Response:
    status = exc.status_code
    if isinstance(exc, ValidationException) or status == 400:
        # Validation errors and bodies that are not JSON: the contract calls both invalid_request (422).
        errors = _validation_errors(exc.extra)
        detail = (
            "; ".join(f"{e['key']}: {e['message']}" if e.get("key") else e["message"] for e in errors)
            if errors
            else exc.detail
        )
        return problem(request, 422, "invalid_request", detail, **({"errors": errors} if errors else {}))
    if isinstance(exc, NotFoundException):
        return problem(request, 404, "not_found", f"no route {request.method} {request.url.path}")
    if isinstance(exc, MethodNotAllowedException):
        return problem(request, 405, "method_not_allowed", exc.detail, headers=exc.headers)
    if isinstance(exc, RequestEntityTooLarge) or status == 413:
        hint = _TOO_LARGE_HINTS.get(request.url.path, "")
        return problem(
            request, 413, "request_too_large", f"the request body is larger than this server takes{hint}"
        )
    if isinstance(exc, NotAuthorizedException):
        return problem(request, 401, "unauthorized", exc.detail, headers={"WWW-Authenticate": "Bearer"})
    if status >= 500:
        log.error("request %s: %s", request_id(request.scope), exc.detail)
        return problem(request, status, "internal_error", HTTPStatus(status).phrase)
    code = HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    return problem(request, status, code, exc.detail, headers=exc.headers)


def _validation_errors(extra: Any) -> list[dict[str, str]]:
    if not isinstance(extra, list):
        return []
    errors = []
    for item in extra:
        if isinstance(item, dict) and "message" in item:
            key, message = str(item.get("key", "")), str(item["message"])
            if message == repr(key):  # what Litestar says of a missing value
                message = "a JSON body is required" if item.get("source") == "body" else "required"
            errors.append({"key": key, "message": message})
    return errors


# --- OpenAPI ------------------------------------------------------------------------------------------------

_DESCRIPTIONS = {
    401: "unauthorized: missing or wrong admin token or API key",
    404: "not found (domain_not_found, version_not_found, job_not_found, ...)",
    409: "conflict (domain_exists, version_conflict, adapter_incompatible, nothing_to_rollback, ...)",
    413: "request_too_large",
    422: "invalid_request (or invalid_passages, invalid_run, ...)",
    503: "overloaded, not_ready, index_not_ready or store_unavailable; see Retry-After",
    504: "request_timeout",
}


def problem_responses(*statuses: int) -> dict[int, ResponseSpec]:
    """OpenAPI entries for the problem responses a handler may give."""
    return {
        status: ResponseSpec(
            data_container=Problem,
            media_type=MEDIA_TYPE,
            description=_DESCRIPTIONS[status],
            generate_examples=False,
        )
        for status in statuses
    }


class ProblemOperation(Operation):
    """Drops Litestar's generic 400 response: validation errors are 422 problems here."""

    def to_schema(self) -> dict[str, Any]:
        schema = super().to_schema()
        schema.get("responses", {}).pop("400", None)
        return schema

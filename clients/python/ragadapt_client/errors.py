"""Typed errors. HTTP errors are chosen by the problem's stable ``code`` and else by status, never by text.

Every error carries what the server said in its RFC 9457 problem (``status``, ``code``, ``detail``, ``type``,
``title``) and the ``request_id`` to quote when asking the operators about it.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from ragadapt_client.models import JobInfo, RunInfo


class RagadaptError(Exception):
    """Base of every error the SDK raises."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        detail: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.detail = detail
        self.request_id = request_id


class APIConnectionError(RagadaptError):
    """The server could not be reached, or the connection broke before a response arrived."""

    def __init__(self, message: str, *, request: httpx.Request, request_id: str | None = None) -> None:
        super().__init__(message, code="connection_error", detail=message, request_id=request_id)
        self.request = request


class APITimeoutError(APIConnectionError):
    """No response within the client's timeout (connecting, sending or reading)."""

    def __init__(self, message: str, *, request: httpx.Request, request_id: str | None = None) -> None:
        super().__init__(message, request=request, request_id=request_id)
        self.code = "timeout"


class APIStatusError(RagadaptError):
    """The server answered with an error status. Subclasses name the statuses the contract uses."""

    def __init__(
        self,
        message: str,
        *,
        response: httpx.Response,
        problem: Mapping[str, Any],
        status: int,
        code: str | None,
        detail: str | None,
        request_id: str | None,
    ) -> None:
        super().__init__(message, status=status, code=code, detail=detail, request_id=request_id)
        self.response = response
        self.problem = dict(problem)
        self.type = problem.get("type")
        self.title = problem.get("title")
        self.retry_after = parse_retry_after(response.headers.get("Retry-After"))


class APIResponseValidationError(RagadaptError):
    """A success response whose body does not match the contract (a server or proxy bug)."""


class BadRequestError(APIStatusError):
    """400."""


class AuthenticationError(APIStatusError):
    """401: missing or wrong admin token or API key."""


class PermissionDeniedError(APIStatusError):
    """403."""


class NotFoundError(APIStatusError):
    """404: ``domain_not_found``, ``version_not_found``, ``run_not_found``, ``job_not_found``."""


class RequestTimeoutError(APIStatusError):
    """408: the server gave up waiting for the request."""


class ConflictError(APIStatusError):
    """409: ``domain_exists``, ``version_conflict``, ``adapter_incompatible``, ``nothing_to_rollback``,
    ``run_finished``. These are decisions about state, so the SDK never retries them."""


class PayloadTooLargeError(APIStatusError):
    """413 ``request_too_large``."""


class UnprocessableEntityError(APIStatusError):
    """422: ``invalid_request``, ``invalid_passages``, ``invalid_run``."""


class RateLimitError(APIStatusError):
    """429."""


class InternalServerError(APIStatusError):
    """500."""


class ServiceUnavailableError(APIStatusError):
    """503: ``overloaded`` (queue full) or ``index_not_ready``; ``retry_after`` says when to come back."""


class GatewayTimeoutError(APIStatusError):
    """504 ``request_timeout``: the answer was not ready within the server's deadline."""


class WaitTimeoutError(RagadaptError, TimeoutError):
    """A ``wait()`` helper gave up before the job or run finished; the job or run itself goes on."""


class JobFailedError(RagadaptError):
    """A background job (ingest, rebuild) ended ``failed`` or ``cancelled``; ``job`` is its final state."""

    def __init__(self, job: JobInfo) -> None:
        super().__init__(
            f"{job.kind} job {job.id} for domain {job.domain!r} {job.state}: {job.error or 'no error given'}",
            code=f"job_{job.state}",
            detail=job.error,
        )
        self.job = job


class RunFailedError(RagadaptError):
    """An adaptation run ended ``failed``; ``run`` is its final state, ``code`` its ``error_code``."""

    def __init__(self, run: RunInfo) -> None:
        super().__init__(
            f"run {run.id} for domain {run.domain!r} failed at step {run.step}: "
            f"{run.error or 'no error given'}",
            code=run.error_code or "run_failed",
            detail=run.error,
        )
        self.run = run


class RunCancelledError(RagadaptError):
    """An adaptation run ended ``cancelled`` while being waited on; ``run`` is its final state."""

    def __init__(self, run: RunInfo) -> None:
        super().__init__(
            f"run {run.id} for domain {run.domain!r} was cancelled at step {run.step}",
            code="run_cancelled",
            detail=run.error,
        )
        self.run = run


STATUS_ERRORS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    408: RequestTimeoutError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: UnprocessableEntityError,
    429: RateLimitError,
    500: InternalServerError,
    503: ServiceUnavailableError,
    504: GatewayTimeoutError,
}

# The codes of docs/http-api.md (and the service's own). A known code decides the class; other codes fall
# back to the status, so a code the server adds later still gets the class of its status.
CODE_ERRORS: dict[str, type[APIStatusError]] = {
    "unauthorized": AuthenticationError,
    "forbidden": PermissionDeniedError,
    "domain_not_found": NotFoundError,
    "version_not_found": NotFoundError,
    "adapter_version_not_found": NotFoundError,
    "run_not_found": NotFoundError,
    "job_not_found": NotFoundError,
    "domain_exists": ConflictError,
    "version_conflict": ConflictError,
    "adapter_incompatible": ConflictError,
    "nothing_to_rollback": ConflictError,
    "run_finished": ConflictError,
    "invalid_qa": UnprocessableEntityError,
    "request_too_large": PayloadTooLargeError,
    "invalid_request": UnprocessableEntityError,
    "invalid_passages": UnprocessableEntityError,
    "invalid_run": UnprocessableEntityError,
    "invalid_domain_name": UnprocessableEntityError,
    "overloaded": ServiceUnavailableError,
    "index_not_ready": ServiceUnavailableError,
    "not_ready": ServiceUnavailableError,
    "store_unavailable": ServiceUnavailableError,
    "request_timeout": GatewayTimeoutError,
}


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date); ``None`` if unusable."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    from datetime import datetime
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def error_from_response(response: httpx.Response, request_id: str | None) -> APIStatusError:
    """The typed error for an error response, from its problem details (or from the status alone when the
    body is not a problem, e.g. an HTML page from a proxy)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    problem: dict[str, Any] = body if isinstance(body, dict) else {}
    code = problem.get("code") if isinstance(problem.get("code"), str) else None
    if code is None and isinstance(problem.get("type"), str) and "/problems/" in problem["type"]:
        code = problem["type"].rsplit("/", 1)[-1] or None
    detail = problem.get("detail") if isinstance(problem.get("detail"), str) else None
    if detail is None and not problem:
        detail = response.text[:500] or None
    request_id = problem.get("request_id") or response.headers.get("X-Request-ID") or request_id
    status = response.status_code
    cls = CODE_ERRORS.get(code or "") or STATUS_ERRORS.get(status, APIStatusError)
    title = problem.get("title") or response.reason_phrase
    message = f"{status} {code or title}: {detail or title}"
    if request_id:
        message += f" (request {request_id})"
    return cls(
        message,
        response=response,
        problem=problem,
        status=status,
        code=code,
        detail=detail,
        request_id=request_id,
    )

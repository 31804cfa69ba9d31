"""When to retry a call and how long to wait, shared by the sync and async clients.

Retried: 408, 429 and 5xx answers and broken connections, with exponential backoff and full jitter, or after
the server's ``Retry-After`` when it sends one. Never retried once it reached the server: a non-idempotent
admin call (``POST`` or ``DELETE /admin/...``) -- a second ingest or run would be a second ingest or run, a
second deletion a 404. Such a call is retried only when the connection failed before the request went out.
409 is never retried: every 409 in the contract (``version_conflict``, ``domain_exists``, ...) reports a
decision about state, and repeating the same request cannot change it; a lost ``version_conflict`` needs a
fresh read of the domain first.
"""

from __future__ import annotations

import random
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Generic, TypeVar

import httpx
from pydantic import ValidationError

from ragadapt_client.errors import (
    APIConnectionError,
    APIResponseValidationError,
    APITimeoutError,
    RagadaptError,
    error_from_response,
)

if TYPE_CHECKING:
    from ragadapt_client.endpoints import Call

T = TypeVar("T")

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# The request never left this machine: safe to send again whatever it was.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# The request may have reached the server: safe to send again only if repeating it changes nothing.
_MAYBE_SENT = (
    httpx.ReadTimeout,
    httpx.WriteTimeout,
    httpx.ReadError,
    httpx.WriteError,
    httpx.RemoteProtocolError,
)


@dataclass(frozen=True)
class RetryPolicy:
    """``max_retries`` extra attempts; the n-th waits a random time in
    ``[0, min(max_backoff, initial_backoff * 2**n)]``, or the server's ``Retry-After`` seconds when it sends
    one (at most ``max_retry_after``)."""

    max_retries: int = 2
    initial_backoff: float = 0.5
    max_backoff: float = 8.0
    max_retry_after: float = 60.0

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if self.initial_backoff < 0 or self.max_backoff < self.initial_backoff:
            raise ValueError("need 0 <= initial_backoff <= max_backoff")

    def with_max_retries(self, max_retries: int) -> RetryPolicy:
        return replace(self, max_retries=max_retries)

    def delay(self, retry: int, retry_after: float | None) -> float:
        """Seconds to wait before retry number ``retry`` (0-based)."""
        if retry_after is not None:
            return min(retry_after, self.max_retry_after)
        return random.uniform(0.0, min(self.max_backoff, self.initial_backoff * 2**retry))


@dataclass
class Outcome(Generic[T]):
    """What one attempt led to: a value, an error to raise, or a wait before the next attempt."""

    value: T | None = None
    error: RagadaptError | None = None
    retry_in: float | None = None

    def result(self) -> T:
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]


class Attempts(Generic[T]):
    """The attempts of one call. The clients do the I/O; this decides what each attempt's result means.

    All attempts of a call send the same ``X-Request-ID``, so the server's logs tie the retries together.
    """

    def __init__(self, call: Call[T], policy: RetryPolicy, request_id: str) -> None:
        self.call = call
        self.policy = policy
        self.request_id = request_id
        self.retries = 0

    def request(
        self, http: httpx.Client | httpx.AsyncClient, headers: dict[str, str], files: ExitStack
    ) -> httpx.Request:
        return self.call.build(http, {**headers, "X-Request-ID": self.request_id}, files)

    def answered(self, response: httpx.Response) -> Outcome[T]:
        if response.is_success:
            try:
                return Outcome(value=self.call.parse(response))
            except (ValidationError, ValueError) as exc:
                return Outcome(
                    error=APIResponseValidationError(
                        f"{self.call.method} {self.call.path}: response does not match the contract: {exc}",
                        status=response.status_code,
                        code="invalid_response",
                        request_id=response.headers.get("X-Request-ID") or self.request_id,
                    )
                )
        error = error_from_response(response, self.request_id)
        if response.status_code in RETRY_STATUSES and self.call.idempotent and self.call.retry_statuses:
            return self._again(error, error.retry_after)
        return Outcome(error=error)

    def failed(self, exc: httpx.HTTPError, request: httpx.Request) -> Outcome[T]:
        what = f"{self.call.method} {request.url}: {type(exc).__name__}: {exc or 'no detail'}"
        cls = APITimeoutError if isinstance(exc, httpx.TimeoutException) else APIConnectionError
        error = cls(what, request=request, request_id=self.request_id)
        error.__cause__ = exc
        if isinstance(exc, _NOT_SENT) or (isinstance(exc, _MAYBE_SENT) and self.call.idempotent):
            return self._again(error, None)
        return Outcome(error=error)

    def _again(self, error: RagadaptError, retry_after: float | None) -> Outcome[T]:
        if self.retries >= self.policy.max_retries:
            return Outcome(error=error)
        delay = self.policy.delay(self.retries, retry_after)
        self.retries += 1
        return Outcome(error=error, retry_in=delay)

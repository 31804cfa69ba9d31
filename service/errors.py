"""Typed errors of the HTTP service, each with a stable `code` and `status` (mapped by `service.problems`)."""

from __future__ import annotations


class ServiceError(Exception):
    code = "service_error"
    status = 500


class InvalidRequest(ServiceError):
    """The request is malformed: empty question, bad ranges, malformed JSON, a bad upload."""

    code = "invalid_request"
    status = 422


class InvalidPassages(ServiceError):
    """Uploaded passages that cannot be read; `line` is the 1-based JSONL line at fault. The one HTTP face of
    indexing's MalformedPassages and EmptyCorpus (`routes/admin.py` checks an upload before anything is
    created), without the path where this server keeps the upload. A QA file's faults are `invalid_qa`."""

    code = "invalid_passages"
    status = 422

    def __init__(self, message: str, *, line: int | None = None):
        super().__init__(message)
        self.line = line


class Unauthorized(ServiceError):
    code = "unauthorized"
    status = 401


class Overloaded(ServiceError):
    """The request queue is full; the client should retry after `retry_after` seconds."""

    code = "overloaded"
    status = 503

    def __init__(self, message: str, *, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class NotReady(ServiceError):
    """The backbone is still loading (or failed to load)."""

    code = "not_ready"
    status = 503
    retry_after = 5


class RunWorkersDown(ServiceError):
    """The thread that replaces dead run workers has ended: adaptation runs would stay queued."""

    code = "run_workers_down"
    status = 503
    retry_after = 30


class RequestTimeout(ServiceError):
    code = "request_timeout"
    status = 504


class JobNotFound(ServiceError):
    code = "job_not_found"
    status = 404


class DomainBuildFailed(ServiceError):
    """The domain has no index because the job building it failed; rebuild or delete the domain."""

    code = "domain_build_failed"
    status = 409


class BuildInProgress(ServiceError):
    """A job is already building the domain's index."""

    code = "build_in_progress"
    status = 409


class NothingToRebuild(ServiceError):
    """Neither live passages nor the passages of the domain's last build are left to build from."""

    code = "nothing_to_rebuild"
    status = 409


class DomainInUse(ServiceError):
    """The domain cannot be deleted while an adaptation run or another server's build job uses it."""

    code = "domain_in_use"
    status = 409

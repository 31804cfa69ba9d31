"""Typed errors of the adapter registry, each with a stable ``code`` mapped to problem details."""

from __future__ import annotations


class AdapterError(Exception):
    """Base of every error raised by ``adapters``."""

    code = "adapter_error"
    status = 500


class AdapterIncompatible(AdapterError):
    """The adapter was trained on a different backbone than the one loaded."""

    code = "adapter_incompatible"
    status = 409


class AdapterVersionNotFound(AdapterError):
    """No complete adapter version with that id in the domain."""

    code = "adapter_version_not_found"
    status = 404


class InvalidAdapterSet(AdapterError):
    """A directory to publish lacks the question/, passage/ and generator/ PEFT adapters."""

    code = "invalid_adapter_set"
    status = 422


class InvalidRun(AdapterError):
    """An adaptation request that cannot run: empty or malformed data, settings that contradict each other."""

    code = "invalid_run"
    status = 422


class InvalidQaSet(AdapterError):
    """A QA file that cannot be read; `line` is the 1-based JSONL line at fault (None for the whole file)."""

    code = "invalid_qa"
    status = 422

    def __init__(self, message: str, *, line: int | None = None):
        super().__init__(f"line {line}: {message}" if line is not None else message)
        self.line = line


class RunNotFound(AdapterError):
    code = "run_not_found"
    status = 404


class RunFinished(AdapterError):
    """The run already ended (succeeded, failed or cancelled): it cannot be cancelled any more."""

    code = "run_finished"
    status = 409


class RunCancelled(AdapterError):
    """Raised inside a run when a cancel request was seen; the run ends `cancelled`."""

    code = "run_cancelled"
    status = 409


class RunInterrupted(AdapterError):
    """Raised inside a run when its worker must stop (service shutdown); the run is queued again and
    resumes."""

    code = "run_interrupted"
    status = 503


class LeaseLost(AdapterError):
    """Another worker took the run over (this one was presumed dead); this worker must stop touching it."""

    code = "run_lease_lost"
    status = 409

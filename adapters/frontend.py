"""What the service calls to submit, read, follow and cancel adaptation runs, whatever executes them: the
local worker processes (`adapters.supervisor.RunManager`) or a Ray cluster (`adapters.ray_runs`). All of it
reads and writes the store, the one source of truth for a run's state, events and checkpoints."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from adapters.queue import cancel, submit
from adapters.records import RunRecord, RunStore
from adapters.registry import AdapterRegistry
from adapters.spec import RunInfo, RunRequest, RunResources
from storage.errors import DomainNotFound
from storage.store import ObjectStore


class RunFrontend(ABC):
    """The store side of runs, and what the service asks of the executor behind it. An executor learns of a
    submitted or cancelled run through `_submitted` and `_cancelled`."""

    max_concurrent = 0  # runs this process's own workers train at once

    @abstractmethod
    def start(self) -> None:
        """Start executing queued runs."""

    @abstractmethod
    def stop(self) -> None:
        """Stop executing runs here (what becomes of a running one is the executor's to say)."""

    @property
    @abstractmethod
    def supervisor(self) -> str:
        """`running`, `stopped`, or `dead` when what should execute runs here has ended (`/readyz` says
        so)."""

    @property
    @abstractmethod
    def alive_workers(self) -> int:
        """Worker processes of this host alive now."""

    @abstractmethod
    def scratch(self) -> tuple[list[Path], set[Path]]:
        """Scratch directories of this host's workers under the work directory, and those in use now."""

    def __init__(
        self,
        store: ObjectStore,
        *,
        cuda_available: bool | None = None,
        resources: RunResources | None = None,
    ):
        """`cuda_available`: what validation assumes about the executors' devices (None: ask torch here).
        `resources`: what a run that names none asks for (recorded in its request)."""
        self.runs = RunStore(store)
        self._cuda_available = cuda_available
        self._resources = resources

    def submit(self, request: RunRequest) -> RunInfo:
        """Validate (DomainNotFound, InvalidRun) and queue a run; returns it queued."""
        if request.resources is None and self._resources is not None:
            request = request.model_copy(update={"resources": self._resources})
        record = submit(self.runs, request, cuda_available=self._cuda_available)
        self._submitted(record)
        return record.info()

    def get(self, run_id: str) -> RunInfo:
        return self.runs.get(run_id).info()

    def list(self, domain: str | None = None) -> list[RunInfo]:
        return [r.info() for r in self.runs.list() if domain is None or r.domain == domain]

    def events(self, run_id: str, after: int = 0, limit: int = 100) -> tuple[list[dict], int, bool]:
        """At most `limit` events after seq `after`, the seq to ask after next, and whether more follow."""
        events, _ = self.runs.events(run_id, after, limit + 1)
        page = events[:limit]
        return page, (page[-1]["seq"] if page else max(after, 0)), len(events) > limit

    def checkpoints(self, run_id: str) -> list[dict[str, Any]]:
        """The adapter versions published at the run's checkpoints, newest first (its last step's version is
        the run's `adapter_version`)."""
        record = self.runs.get(run_id)
        try:
            versions = AdapterRegistry(self.runs.store).list(record.domain)
        except DomainNotFound:  # deleted since
            return []
        found = [
            {
                "step": m.metadata["checkpoint_step"],
                "created_at": m.created_at,
                "adapter_version": m.version,
                "metrics": dict((m.metadata.get("metrics") or {}).get("checkpoint") or {}),
            }
            for m in versions
            if m.metadata.get("run_id") == run_id and m.metadata.get("checkpoint_step") is not None
        ]
        return sorted(found, key=lambda c: c["step"], reverse=True)

    def cancel(self, run_id: str) -> RunInfo:
        """Cancel a run: a queued one at once, a running one at its worker's next micro-batch (the returned
        info says `cancel_requested` until then). RunFinished if it already ended."""
        record = cancel(self.runs, run_id)
        self._cancelled(record)
        return record.info()

    @abstractmethod
    def _submitted(self, record: RunRecord) -> None:
        """A run was queued."""

    @abstractmethod
    def _cancelled(self, record: RunRecord) -> None:
        """A run was cancelled (queued: it ended at once) or asked to stop (running: at its next
        micro-batch)."""

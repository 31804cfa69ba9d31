"""A worker's hold on the run it claimed (`RunContext`): the cancel and stop checks between micro-batches,
the lease it renews, and the progress, events and checkpoints it writes to the run's record.

Store writes are batched: step events and progress go out at most every `flush_s` seconds (and with every
other event), the lease is renewed with them; run.json is read at every `tick` for a cancel request. Every
write is conditional on the lease: a worker that lost its run (`LeaseLost`) stops touching it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters.errors import LeaseLost, RunCancelled, RunInterrupted
from adapters.records import RunRecord, RunStore, lease_expiry, now
from storage import artifacts

if TYPE_CHECKING:
    from adapters.training import TrainerState

ProgressFn = Callable[[str, int, int, dict], None]  # (stage, done, total, latest step metrics)


class RunContext:
    """The executing side of one claimed run: cancel/stop checks, lease renewal, progress, events,
    checkpoints.

    Store writes are batched: step events and progress go out at most every `flush_s` seconds (and with
    every other event), the lease is renewed with them; run.json is read at every `tick` for a cancel
    request.
    """

    def __init__(
        self,
        runs: RunStore,
        record: RunRecord,
        owner: str,
        *,
        lease_s: float = 120.0,
        should_stop: Callable[[], bool] = lambda: False,
        on_progress: ProgressFn | None = None,
        flush_s: float = 1.0,
    ):
        self.runs = runs
        self.record = record
        self.owner = owner
        self.lease_s = lease_s
        self.should_stop = should_stop
        self.on_progress = on_progress
        self.flush_s = flush_s
        self._events: list[dict] = []
        self._progress: dict[str, Any] = {}
        self._flushed = time.monotonic()
        self._stage = ""
        self._pace: tuple[float, int] | None = None  # (time, step) of the first step seen by this worker
        # Called with each checkpoint (step, directory, trainer state); returns the adapter version it made.
        self.on_checkpoint: Callable[[int, Path, TrainerState], str | None] | None = None

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def latest(self) -> dict[str, float]:
        """The metrics of the last step (flushed to the record or not)."""
        return dict(self._progress.get("latest") or self.record.latest or {})

    def tick(self) -> None:
        if self.should_stop():
            raise RunInterrupted("the worker is stopping")
        current = self.runs.get(self.id)
        if current.owner != self.owner:
            raise LeaseLost(f"run {self.id} was taken over by {current.owner}")
        if current.cancel_requested:
            raise RunCancelled("cancelled on request")
        if time.monotonic() - self._flushed >= min(self.flush_s, self.lease_s / 4):
            self.flush()

    def stage(self, name: str, done: int = 0, total: int = 0) -> None:
        self._stage = name
        if self.on_progress is not None:
            self.on_progress(name, done, total, {})

    def progress(self, done: int, total: int) -> None:
        if self.on_progress is not None:
            self.on_progress(self._stage, done, total, {})
        self.tick()

    def event(self, kind: str, **payload: Any) -> None:
        self._events.append({"time": now().isoformat(), "kind": kind, **payload})
        self.flush()

    def step(self, step: int, latest: dict[str, float]) -> None:
        self._events.append({"time": now().isoformat(), "kind": "step", "step": step, **latest})
        self._progress = {"step": step, "latest": latest, "estimated_finish": self._estimate(step)}
        if self.on_progress is not None:
            self.on_progress("training", step, self.record.total_steps, latest)
        if time.monotonic() - self._flushed >= self.flush_s or step == self.record.total_steps:
            self.flush()

    def discard_pending(self) -> None:
        """Forget step events and progress not flushed yet (the run resumes from before them)."""
        self._events = []
        self._progress = {}

    def _estimate(self, step: int) -> datetime | None:
        """When training should end, at the pace of the steps this worker took so far."""
        clock = time.monotonic()
        if self._pace is None:
            self._pace = (clock, step)
            return self.record.estimated_finish
        started, first = self._pace
        if step <= first or clock <= started:
            return self.record.estimated_finish
        per_step = (clock - started) / (step - first)
        return now() + timedelta(seconds=per_step * (self.record.total_steps - step))

    def flush(self) -> None:
        if self._events:
            self.runs.append_events(self.id, self._events)
            self._events = []
        self.update(**self._progress)
        self._flushed = time.monotonic()

    def update(self, **fields: Any) -> RunRecord:
        """Change run.json fields (and renew the lease) if this worker still holds the run."""
        lease_s = self.lease_s

        def change(record: RunRecord) -> RunRecord:
            for name, value in fields.items():
                setattr(record, name, value)
            record.lease_until = lease_expiry(lease_s)
            return record

        self.record = self.runs.update(self.id, change, owner=self.owner)
        return self.record

    # RunHooks of the trainer

    def upload_index(self, directory: Path, build_id: str) -> str:
        """Store a mid-run index beside the run (a checkpoint refers to it); returns its version."""
        manifest = artifacts.publish(
            self.runs.store, self.runs.indexes_prefix(self.id), directory, {"build_id": build_id}
        )
        return manifest.version

    def checkpoint(self, step: int, directory: Path, state: TrainerState) -> None:
        """Publish a checkpoint directory, then drop older checkpoints and mid-run indexes it no longer
        needs."""
        store, prefix = self.runs.store, self.runs.checkpoints_prefix(self.id)
        manifest = artifacts.publish(store, prefix, directory, {"step": step, "index": state.index})
        self.runs.drop_artifacts(self.id, keep_checkpoints=1)
        referenced = state.index.get("version") if state.index.get("kind") == "run" else None
        for old in artifacts.list_versions(store, self.runs.indexes_prefix(self.id)):
            if old.version != referenced:
                artifacts.delete_version(store, self.runs.indexes_prefix(self.id), old.version)
        adapter_version = self.on_checkpoint(step, directory, state) if self.on_checkpoint else None
        self._events.append(
            {
                "time": now().isoformat(),
                "kind": "checkpoint",
                "step": step,
                "version": manifest.version,
                "adapter_version": adapter_version,
            }
        )
        self._progress = {**self._progress, "checkpoint_step": step}
        self.flush()

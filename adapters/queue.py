"""Every state transition of a run, on its record: submit, claim, requeue, cancel, finish. Torch-free.

Transitions are compare-and-swaps on run.json (`RunStore.update`), each followed by its event, so the HTTP
process (submit, cancel), the workers (claim, progress, finish) and the supervisor (requeue the runs of a
dead worker) never lose one another's writes. The queue itself is a marker per queued or running run
(`runs/queue/<id>`), which workers scan oldest first.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta
from typing import Any

from adapters.errors import LeaseLost, RunFinished, RunNotFound
from adapters.lease import RunContext
from adapters.records import RunRecord, RunStore, lease_expiry, now, owner_is_dead_here
from adapters.spec import RunRequest, RunState
from adapters.validation import Prepared, prepare
from storage import new_version_id
from storage.errors import PreconditionFailed

SUBMIT_GRACE_S = 60.0  # a validating run with a queue marker older than this was queued by a submit that died


def submit(
    runs: RunStore,
    request: RunRequest,
    *,
    cuda_available: bool | None = None,
    owner: str | None = None,
    lease_s: float = 120.0,
) -> RunRecord:
    """Validate `request`, persist it with its frozen inputs and queue it. With `owner` the run is created
    already claimed by that owner (the CLI runs it in its own process)."""
    run_id = new_version_id()
    prepared: Prepared = prepare(runs.store, request, run_id, cuda_available=cuda_available)
    record = runs.create(prepared.record)
    try:
        for name, data in prepared.inputs.items():
            runs.put_input(run_id, name, data)
        # The marker before the state: a crash between the two leaves a validating run with a marker, which
        # claim_next takes after SUBMIT_GRACE_S (the other order left a queued run no worker could see).
        runs.enqueue(run_id)

        def queued(r: RunRecord) -> RunRecord | None:
            if r.state != RunState.VALIDATING:  # taken by a worker meanwhile
                return None
            if owner is None:
                r.state = RunState.QUEUED
            else:
                r.state, r.owner, r.lease_until = RunState.RUNNING, owner, lease_expiry(lease_s)
            return r

        record = runs.update(run_id, queued)
        runs.append_events(
            run_id,
            [
                {"kind": "state", "state": "validating"},
                {"kind": "state", "state": record.state.value, "total_steps": record.total_steps},
            ],
        )
    except BaseException:
        runs.delete(run_id)
        raise
    return record


def claim_next(runs: RunStore, owner: str, *, lease_s: float, max_crashes: int) -> RunRecord | None:
    """Take the oldest queued run (or a running one whose worker is gone); None when there is none. Oldest
    by creation time: ids sort only to the second, so two runs submitted within one would start in a random
    order by id."""
    candidates = []
    for run_id in runs.active():
        try:
            record = runs.get(run_id)
        except RunNotFound:  # a marker without a record: a submit that failed half-way
            runs.dequeue(run_id)
            continue
        if record.state.finished:
            runs.dequeue(run_id)
            continue
        if claimable(record):
            candidates.append(record)
    for record in sorted(candidates, key=lambda r: (r.created_at, r.id)):
        claimed = claim(runs, record.id, owner, lease_s=lease_s, max_crashes=max_crashes)
        if claimed is not None:
            return claimed
    return None


def claimable(record: RunRecord) -> bool:
    """Whether an executor may take the run now: queued, stuck in a submit that died, or running with its
    worker gone (lease run out, or a dead process of this host)."""
    if record.state == RunState.QUEUED:
        return True
    if record.state == RunState.VALIDATING:  # queued, but its submit ended before it could say so
        return record.created_at < now() - timedelta(seconds=SUBMIT_GRACE_S)
    if record.state != RunState.RUNNING:
        return False
    expired = record.lease_until is None or record.lease_until < now()
    return expired or owner_is_dead_here(record.owner)


def claim(runs: RunStore, run_id: str, owner: str, *, lease_s: float, max_crashes: int) -> RunRecord | None:
    """Take one run for `owner` if it can be taken (queued, or running with its worker gone); None
    otherwise. A run whose worker died more than `max_crashes` times fails instead."""
    crashed = submit_interrupted = False

    def take(record: RunRecord) -> RunRecord | None:
        nonlocal crashed, submit_interrupted
        if not claimable(record):
            return None
        crashed = record.state == RunState.RUNNING  # its previous worker vanished without releasing it
        submit_interrupted = record.state == RunState.VALIDATING
        if crashed:
            record.crashes += 1
            if record.crashes > max_crashes:
                record.state, record.finished_at = RunState.FAILED, now()
                record.error_code = "worker_died"
                record.error = f"the worker running it died {record.crashes} times"
                record.owner = record.lease_until = None
                return record
        record.state, record.owner, record.lease_until = RunState.RUNNING, owner, lease_expiry(lease_s)
        return record

    try:
        record = runs.update(run_id, take)
    except PreconditionFailed:
        return None
    if record.state == RunState.FAILED:
        runs.append_events(run_id, [{"kind": "state", "state": "failed", "error": record.error}])
        runs.dequeue(run_id)
        runs.drop_artifacts(run_id)
        return None
    if record.owner != owner:
        return None
    interrupted = [{"kind": "state", "state": "queued", "reason": "its submit ended before it said so"}]
    runs.append_events(
        run_id,
        [
            *(interrupted if submit_interrupted else []),
            {
                "kind": "state",
                "state": "running",
                "owner": owner,
                "after_crash": crashed,
                "checkpoint_step": record.checkpoint_step,
            },
        ],
    )
    return record


def requeue(
    runs: RunStore, run_id: str, *, reason: str, owner: str | None = None, crashed: bool = False
) -> None:
    """Put a running run back in the queue (its worker stopped or died); it resumes from its last
    checkpoint. That is the newest one in the store: a worker killed after publishing a checkpoint but
    before recording it in run.json leaves the record a checkpoint behind, so the record is brought up to
    it here."""
    latest = runs.latest_checkpoint(run_id)
    stored = int(latest.metadata["step"]) if latest is not None else None

    def back(record: RunRecord) -> RunRecord | None:
        if record.state != RunState.RUNNING or (owner is not None and record.owner != owner):
            return None
        record.state, record.owner, record.lease_until = RunState.QUEUED, None, None
        if stored is not None and stored > (record.checkpoint_step or 0):
            record.checkpoint_step = stored
        if crashed:
            record.crashes += 1
        return record

    record = runs.update(run_id, back)
    if record.state == RunState.QUEUED:
        runs.append_events(
            run_id,
            [{"kind": "state", "state": "queued", "reason": reason, "resumes_from": record.checkpoint_step}],
        )


def cancel(runs: RunStore, run_id: str) -> RunRecord:
    """Cancel a run: a queued one at once, a running one at its worker's next micro-batch (the record says
    `cancel_requested` until then). RunFinished if it already ended."""

    def change(record: RunRecord) -> RunRecord | None:
        if record.state.finished:
            raise RunFinished(f"run {run_id} already {record.state.value}")
        if record.cancel_requested:
            return None
        record.cancel_requested = True
        if record.state in (RunState.QUEUED, RunState.VALIDATING):
            record.state, record.finished_at = RunState.CANCELLED, now()
        return record

    seen = runs.get(run_id)
    logged = seen.state == RunState.RUNNING and not seen.cancel_requested
    if logged:
        # The request is logged before its flag is set: the worker stops only once it sees the flag, so its
        # final state event comes after this one and stays the run's last event.
        runs.append_events(run_id, [{"kind": "state", "state": "running", "cancel_requested": True}])
    record = runs.update(run_id, change)
    if record.state == RunState.CANCELLED:
        runs.append_events(run_id, [{"kind": "state", "state": "cancelled"}])
        runs.dequeue(run_id)
        runs.drop_artifacts(run_id)
    elif not logged:  # claimed between the read and the flag (or validating): log the request now
        runs.append_events(run_id, [{"kind": "state", "state": record.state.value, "cancel_requested": True}])
    return record


def finish(
    ctx: RunContext, state: RunState, *, code: str | None = None, error: str | None = None, **outcome: Any
) -> None:
    """End a claimed run (succeeded, failed or cancelled) under its worker's lease. What is pending goes
    out first; the state event (with `outcome`, or the error) comes before the state itself, so whoever sees
    the run finished finds its last event already logged."""
    with contextlib.suppress(LeaseLost, PreconditionFailed):
        ctx.flush()
    ctx.event("state", state=state.value, **outcome, **({"error": error, "code": code} if error else {}))
    ctx.update(state=state, finished_at=now(), error=error, error_code=code)


def fail_stuck_submit(runs: RunStore, run_id: str) -> None:
    """A run left validating without a queue marker (its submit died before queueing it) ends failed."""

    def fail(record: RunRecord) -> RunRecord | None:
        if record.state != RunState.VALIDATING:
            return None
        record.state, record.finished_at = RunState.FAILED, now()
        record.error_code, record.error = "submit_interrupted", "its submit ended before it was queued"
        return record

    runs.update(run_id, fail)
    runs.append_events(run_id, [{"kind": "state", "state": "failed", "code": "submit_interrupted"}])

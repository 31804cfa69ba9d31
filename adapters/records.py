"""Adaptation runs as stored: the record (`RunRecord`), its events, inputs and queue marker (`RunStore`).

A run is a persisted state machine, so a restart loses nothing (`adapters.queue` makes every transition):

    validating -> queued -> running -> succeeded | failed | cancelled
                     ^         |
                     +---------+   interrupted (worker died, service stopping): resumes from its checkpoint

Store layout, all under `runs/` (S3 has no append, so events are pages rewritten by compare-and-swap):

    runs/<run_id>/run.json                    the record: state and outcome, the request, the worker's lease
    runs/<run_id>/events/<page:06d>.json      events; page p holds seq p*PAGE+1 .. (p+1)*PAGE (PAGE=100)
    runs/<run_id>/inputs/train.jsonl          training examples, validated and frozen at submit (QA lines)
    runs/<run_id>/inputs/eval.jsonl           evaluation examples (the domain's dev split unless given)
    runs/<run_id>/inputs/reconstruction.txt   reconstruction sentences, one a line (when given explicitly)
    runs/<run_id>/checkpoints/<version>/      adapter set, optimizer, RNG and trainer state (manifest last)
    runs/<run_id>/indexes/<version>/          a mid-run index a checkpoint trains against (manifest last)
    runs/queue/<run_id>                       exists while the run is queued or running: what workers scan

Checkpoints and mid-run indexes are deleted when a run ends; the record, its inputs and events stay.

`RunRecord` is its own model, not the API's `RunInfo` with more fields: a field added to the API does not
change run.json, and a field of the record is not published by accident. `info()` is the one projection.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, Field

from adapters.errors import LeaseLost, RunNotFound
from adapters.spec import Mode, PromotePolicy, RunInfo, RunRequest, RunState
from storage import artifacts
from storage.errors import ObjectNotFound, PreconditionFailed
from storage.store import ObjectStore

EVENTS_PER_PAGE = 100
QUEUE_PREFIX = "runs/queue/"
RUN_ID = artifacts.VERSION_ID  # run ids are version ids (new_version_id); matched whole


class RunRecord(BaseModel):
    """`runs/<id>/run.json`: where a run is and what it produced, what its workers need (the request, the
    pinned QA version) and who holds it (the worker's lease)."""

    id: str
    domain: str
    mode: Mode
    state: RunState
    step: int = 0
    total_steps: int
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = None
    error_code: str | None = None
    metrics: dict[str, Any] = Field(default_factory=lambda: {"base": None, "final": None})
    adapter_version: str | None = None
    index_version: str | None = None
    promoted: bool = False
    latest: dict[str, float] | None = None  # loss, lr, examples_per_s of the last step
    parent: str | None = None  # the adapter version live when the run was submitted
    promote: PromotePolicy = "if_better"
    cancel_requested: bool = False
    metadata: dict[str, str] = Field(default_factory=dict)
    estimated_finish: datetime | None = None  # when training should end, at the pace of its recent steps
    request: RunRequest
    qa_version: str | None = None  # the domain QA version the inputs came from, if any
    owner: str | None = None  # "<host>/<pid>/<token>" of the worker holding the run
    lease_until: datetime | None = None
    crashes: int = 0  # how many times the worker holding it died (a graceful stop does not count)
    checkpoint_step: int | None = None  # the step of the newest complete checkpoint
    etag: str | None = Field(default=None, exclude=True)

    def info(self) -> RunInfo:
        """What the API reports of the run."""
        fields = self.model_dump(include=set(RunInfo.model_fields))
        return RunInfo.model_validate({**fields, "resources": self.request.resources})


def now() -> datetime:
    return datetime.now(UTC)


def open_spec_store(store: Any) -> ObjectStore:
    """The store a worker process or a run's actor was handed: an ObjectStore that pickles (LocalStore) as
    it is, or a storage.StoreConfig opened here."""
    if isinstance(store, ObjectStore):
        return store
    from storage import open_store

    return open_store(store)


def owner_token(token: str) -> str:
    return f"{socket.gethostname()}/{os.getpid()}/{token}"


def owner_is_dead_here(owner: str | None) -> bool:
    """True when `owner` names a process on this host that no longer exists (so its run can be taken at
    once)."""
    if not owner:
        return True
    host, _, rest = owner.partition("/")
    pid_text = rest.partition("/")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def lease_expiry(seconds: float) -> datetime:
    return now() + timedelta(seconds=seconds)


# --- persistence --------------------------------------------------------------------------------------------


class RunStore:
    """Run records, events, inputs and the queue markers on the artifact store. Every record change is a
    compare-and-swap on run.json, so the HTTP process (cancel) and a worker (progress) never lose each
    other's writes, and a worker that lost its lease learns it at its next write."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    # record

    @staticmethod
    def record_key(run_id: str) -> str:
        return f"runs/{_check_id(run_id)}/run.json"

    def create(self, record: RunRecord) -> RunRecord:
        info = self.store.put_bytes(self.record_key(record.id), _dump(record), if_none_match=True)
        return record.model_copy(update={"etag": info.etag})

    def get(self, run_id: str) -> RunRecord:
        try:
            data, info = self.store.read(self.record_key(run_id))
        except ObjectNotFound as exc:
            raise RunNotFound(f"no run {run_id!r}") from exc
        return RunRecord.model_validate_json(data).model_copy(update={"etag": info.etag})

    def update(
        self,
        run_id: str,
        change: Callable[[RunRecord], RunRecord | None],
        *,
        owner: str | None = None,
        attempts: int = 20,
    ) -> RunRecord:
        """Read-modify-write run.json until the write wins. `change` returns the new record (None: no
        change). With `owner`, the record must still be held by it, else LeaseLost."""
        for _ in range(attempts):
            current = self.get(run_id)
            if owner is not None and current.owner != owner:
                raise LeaseLost(f"run {run_id} is now held by {current.owner!r}, not {owner!r}")
            updated = change(current.model_copy(deep=True))
            if updated is None:
                return current
            try:
                info = self.store.put_bytes(self.record_key(run_id), _dump(updated), if_match=current.etag)
            except PreconditionFailed:
                continue
            return updated.model_copy(update={"etag": info.etag})
        raise PreconditionFailed(f"run {run_id}: run.json kept changing under {attempts} attempts")

    def list(self) -> list[RunRecord]:
        records = []
        for info in self.store.list("runs/"):
            parts = info.key.split("/")
            if len(parts) == 3 and parts[2] == "run.json" and RUN_ID.fullmatch(parts[1]):
                try:
                    records.append(self.get(parts[1]))
                except RunNotFound:
                    continue
        return sorted(records, key=lambda r: (r.created_at, r.id), reverse=True)

    def delete(self, run_id: str) -> None:
        for info in list(self.store.list(f"runs/{_check_id(run_id)}/")):
            self.store.delete(info.key)
        self.store.delete(f"{QUEUE_PREFIX}{run_id}")

    # queue markers

    def enqueue(self, run_id: str) -> None:
        self.store.put_bytes(f"{QUEUE_PREFIX}{_check_id(run_id)}", b"")

    def dequeue(self, run_id: str) -> None:
        self.store.delete(f"{QUEUE_PREFIX}{_check_id(run_id)}")

    def active(self) -> list[str]:
        """Ids of runs queued or running, sorted by id (to the second by creation time; `queue.claim_next`
        orders by the records' creation times)."""
        return sorted(info.key[len(QUEUE_PREFIX) :] for info in self.store.list(QUEUE_PREFIX))

    # inputs

    def put_input(self, run_id: str, name: str, data: bytes) -> str:
        key = f"runs/{_check_id(run_id)}/inputs/{name}"
        self.store.put_bytes(key, data)
        return key

    def get_input(self, run_id: str, name: str) -> bytes | None:
        try:
            return self.store.get_bytes(f"runs/{_check_id(run_id)}/inputs/{name}")
        except ObjectNotFound:
            return None

    # events

    def append_events(self, run_id: str, events: list[dict[str, Any]]) -> int:
        """Append events (each gets `seq` and `time` unless it has one); returns the last seq written."""
        if not events:
            return self.last_seq(run_id)
        prefix = f"runs/{_check_id(run_id)}/events/"
        pending = [dict(e) for e in events]
        while pending:
            pages = sorted(info.key for info in self.store.list(prefix))
            if pages:
                data, info = self.store.read(pages[-1])
                page_events, etag, page = json.loads(data), info.etag, int(pages[-1][len(prefix) : -5])
            else:
                page_events, etag, page = [], None, 0
            room = EVENTS_PER_PAGE - len(page_events)
            if room <= 0:
                page_events, etag, page = [], None, page + 1
                room = EVENTS_PER_PAGE
            seq = page * EVENTS_PER_PAGE + len(page_events)
            batch = []
            for event in pending[:room]:
                seq += 1
                batch.append({"seq": seq, "time": event.pop("time", None) or now().isoformat(), **event})
            key = f"{prefix}{page:06d}.json"
            body = json.dumps(page_events + batch, separators=(",", ":")).encode()
            try:
                if etag is None:
                    self.store.put_bytes(key, body, if_none_match=True)
                else:
                    self.store.put_bytes(key, body, if_match=etag)
            except PreconditionFailed:
                for event, written in zip(pending, batch):
                    event["time"] = written["time"]
                continue
            pending = pending[room:]
            last = seq
        return last

    def events(
        self, run_id: str, after: int = 0, limit: int | None = None
    ) -> tuple[list[dict[str, Any]], int]:
        """Events with seq > `after`, oldest first (at most `limit`), and the seq to pass as `after` next
        time."""
        self.get(run_id)
        prefix = f"runs/{_check_id(run_id)}/events/"
        first_page = max(after, 0) // EVENTS_PER_PAGE
        found = []
        for info in self.store.list(prefix):
            page = int(info.key[len(prefix) : -5])
            if page < first_page:
                continue
            if limit is not None and len(found) >= limit:
                break
            try:
                found += [e for e in json.loads(self.store.get_bytes(info.key)) if e["seq"] > after]
            except ObjectNotFound:
                continue
        found.sort(key=lambda e: e["seq"])
        found = found[:limit] if limit is not None else found
        return found, (found[-1]["seq"] if found else max(after, 0))

    def last_seq(self, run_id: str) -> int:
        prefix = f"runs/{_check_id(run_id)}/events/"
        pages = sorted(info.key for info in self.store.list(prefix))
        if not pages:
            return 0
        events = json.loads(self.store.get_bytes(pages[-1]))
        return events[-1]["seq"] if events else 0

    # checkpoints and mid-run indexes (storage.artifacts versions under the run)

    @staticmethod
    def checkpoints_prefix(run_id: str) -> str:
        return f"runs/{_check_id(run_id)}/checkpoints"

    @staticmethod
    def indexes_prefix(run_id: str) -> str:
        return f"runs/{_check_id(run_id)}/indexes"

    def latest_checkpoint(self, run_id: str) -> artifacts.Manifest | None:
        versions = artifacts.list_versions(self.store, self.checkpoints_prefix(run_id))
        return versions[-1] if versions else None

    def drop_artifacts(self, run_id: str, *, keep_checkpoints: int = 0) -> None:
        """Delete checkpoints (all but the newest `keep_checkpoints`) and, with none kept, mid-run indexes."""
        prefix = self.checkpoints_prefix(run_id)
        versions = artifacts.list_versions(self.store, prefix)
        for manifest in versions[: max(len(versions) - keep_checkpoints, 0)]:
            artifacts.delete_version(self.store, prefix, manifest.version)
        if keep_checkpoints == 0:
            for info in list(self.store.list(self.indexes_prefix(run_id) + "/")):
                self.store.delete(info.key)
            for info in list(self.store.list(prefix + "/")):
                self.store.delete(info.key)


def _check_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
        raise RunNotFound(f"no run {run_id!r}")
    return run_id


def _dump(record: RunRecord) -> bytes:
    return record.model_dump_json(indent=1).encode()

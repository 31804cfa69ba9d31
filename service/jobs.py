"""Background jobs of the admin API: building a new domain's index from its uploaded passages (`ingest`) and
building a domain's index again (`rebuild`).

A job is a persisted state machine, like an adaptation run, so a restart loses nothing:

    pending -> running -> succeeded | failed | cancelled
       ^          |
       +----------+   the store was unavailable (tried again with backoff), or the server running it stopped

Store layout (the passages go to the store before the job exists, so any server can run it):

    jobs/<id>/job.json          the record (`JobRecord`): state, progress, error, result, owner and lease
    jobs/<id>/passages.jsonl    the passages an ingest job builds from
    jobs/active/<id>            exists while the job is pending or running: what servers scan for work

A domain's record names the job that builds its index (`Domain.build_job`): while that job is pending or
running, `/ask` answers 503 `index_not_ready`; once it failed, 409 `domain_build_failed` with the reason,
until the domain is rebuilt or deleted.

Each job runs as an `indexing.rebuild.RebuildJob` (a worker process encodes and indexes; the live pointer
moves by compare-and-swap), at most `max_concurrent` at once in this process. The poller calls `sweep()`: it
writes the progress of the jobs running here and renews their leases, records the jobs that ended, and starts
pending jobs, including those of a server that stopped (its process is gone or its lease ran out).
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from adapters import AdapterRegistry
from adapters.records import owner_is_dead_here, owner_token
from backbone import BackboneConfig
from indexing import IndexConfig
from indexing.encoder import EncodeConfig
from indexing.errors import IndexNotReady
from indexing.rebuild import RebuildJob, RebuildResult, RebuildSpec, RebuildState
from indexing.versions import IndexVersions
from storage import (
    DomainNotFound,
    ObjectNotFound,
    ObjectStore,
    PreconditionFailed,
    StoreError,
    new_version_id,
)
from storage.artifacts import VERSION_ID

from .errors import BuildInProgress, DomainBuildFailed, JobNotFound, NothingToRebuild
from .metrics import Metrics
from .schemas import JobInfo

log = logging.getLogger(__name__)

JobState = Literal["pending", "running", "succeeded", "failed", "cancelled"]
FINISHED = ("succeeded", "failed", "cancelled")
PASSAGES = "passages.jsonl"
ACTIVE_PREFIX = "jobs/active/"
# How far along a job is, by the rebuild stage it reports; encoding spans most of the time.
_STAGE_PROGRESS = {
    "pending": 0.0,
    "preparing": 0.02,
    "starting": 0.05,
    "loading": 0.1,
    "reading": 0.15,
    "indexing": 0.9,
    "publishing": 0.95,
    "flipping": 0.98,
    "done": 1.0,
}
_MAX_RETRIES = 8  # store outages a job waits out before it fails
_WRITE_EVERY_S = 2.0  # progress of a running job goes to its record at most this often


def _now() -> datetime:
    return datetime.now(UTC)


class JobRecord(BaseModel):
    """`jobs/<id>/job.json`."""

    id: str
    kind: Literal["ingest", "rebuild"]
    domain: str
    state: JobState = "pending"
    progress: float = 0.0
    error: str | None = None
    error_code: str | None = None
    result: dict[str, Any] | None = None
    created_at: datetime = Field(default_factory=_now)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    input: str | None = None  # store key of the passages to ingest; None: the domain's live passages
    index: dict[str, Any] | None = None  # IndexConfig fields; None: the live index's settings
    replacing: str | None = None  # the index version live when the job started
    owner: str | None = None
    lease_until: datetime | None = None
    crashes: int = 0  # servers that stopped while running it
    retries: int = 0  # store outages it waited out
    retry_at: datetime | None = None
    etag: str | None = Field(default=None, exclude=True)

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    def info(self) -> JobInfo:
        error = None if self.error is None else f"{self.error_code}: {self.error}"
        return JobInfo(
            id=self.id,
            kind=self.kind,
            domain=self.domain,
            state=self.state,
            progress=self.progress,
            error=error,
            result=self.result,
        )


class JobStore:
    """Job records, inputs and active markers on the artifact store; every record change is a
    compare-and-swap on job.json."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    @staticmethod
    def key(job_id: str, name: str = "job.json") -> str:
        if not isinstance(job_id, str) or not VERSION_ID.fullmatch(job_id):
            raise JobNotFound(f"no job {job_id!r}")
        return f"jobs/{job_id}/{name}"

    def create(self, record: JobRecord) -> JobRecord:
        info = self.store.put_bytes(self.key(record.id), _dump(record), if_none_match=True)
        self.store.put_bytes(f"{ACTIVE_PREFIX}{record.id}", b"")
        return record.model_copy(update={"etag": info.etag})

    def get(self, job_id: str) -> JobRecord:
        try:
            data, info = self.store.read(self.key(job_id))
        except ObjectNotFound:
            raise JobNotFound(f"no job {job_id!r}") from None
        return JobRecord.model_validate_json(data).model_copy(update={"etag": info.etag})

    def update(
        self, job_id: str, change: Callable[[JobRecord], JobRecord | None], *, owner: str | None = None
    ) -> JobRecord | None:
        """Read-modify-write job.json until the write wins. With `owner`, only while the job is held by it
        (None when it is not: another server took it over)."""
        for _ in range(20):
            try:
                current = self.get(job_id)
            except JobNotFound:
                if owner is not None:  # its record is gone: nobody holds it any more
                    return None
                raise
            if owner is not None and current.owner != owner:
                return None
            updated = change(current.model_copy(deep=True))
            if updated is None:
                return current
            try:
                info = self.store.put_bytes(self.key(job_id), _dump(updated), if_match=current.etag)
            except PreconditionFailed:
                continue
            if updated.finished:
                self.store.delete(f"{ACTIVE_PREFIX}{job_id}")
            return updated.model_copy(update={"etag": info.etag})
        raise PreconditionFailed(f"job {job_id}: job.json kept changing")

    def active(self) -> list[str]:
        """Ids of pending and running jobs, sorted by id (to the second by creation time; `pump` orders
        by the records' creation times)."""
        return sorted(info.key[len(ACTIVE_PREFIX) :] for info in self.store.list(ACTIVE_PREFIX))


def _dump(record: JobRecord) -> bytes:
    return record.model_dump_json(indent=1).encode()


@dataclass
class _Local:
    """A job this process holds: its record as last written and, once started, its rebuild."""

    record: JobRecord
    rebuild: RebuildJob | None = None
    written: float = 0.0
    stopping: bool = False  # cancelled because this server stops: the job goes back to pending
    failure: Exception | None = None  # why it could not start (recorded at the next sweep if not yet)


class Jobs:
    def __init__(
        self,
        store: ObjectStore,
        versions: IndexVersions,
        backbone: BackboneConfig,
        fingerprint: str,
        work_dir: Path,
        metrics: Metrics,
        on_live: Callable[[str], object],
        *,
        max_concurrent: int = 2,
        lease_s: float = 60.0,
        max_crashes: int = 2,
        encode: EncodeConfig | None = None,
        new_index: Callable[[str], IndexConfig] = lambda retrieval: IndexConfig(retrieval=retrieval),
    ):
        """`encode`: how the jobs' builds encode passages (None: in their worker processes here).
        `new_index(retrieval)`: the index settings of a domain's first build."""
        self._jobs = JobStore(store)
        self._versions = versions
        self._registry = versions.registry
        self._backbone = backbone
        self._fingerprint = fingerprint
        self._work_dir = Path(work_dir)
        self._metrics = metrics
        self._on_live = on_live
        self._max_concurrent = max_concurrent
        self._lease_s = lease_s
        self._max_crashes = max_crashes
        self._encode = encode or EncodeConfig(progress=False)
        self._new_index = new_index
        self._owner = owner_token(f"jobs-{secrets.token_hex(4)}")
        self._local: dict[str, _Local] = {}
        self._lock = threading.Lock()

    @property
    def store(self) -> JobStore:
        return self._jobs

    # --- creating jobs (request threads) --------------------------------------------------------------------

    def new_input(self) -> tuple[str, Path]:
        """A fresh job id and the local directory its input files go in."""
        job_id = new_version_id()
        directory = self.input_dir(job_id)
        directory.mkdir(parents=True)
        return job_id, directory

    def input_dir(self, job_id: str) -> Path:
        return self._work_dir / "inputs" / job_id

    def store_input(self, job_id: str, passages: Path) -> str:
        """Put an ingest job's passages in the store (before the job or its domain exist); returns the key."""
        key = self._jobs.key(job_id, PASSAGES)
        self._jobs.store.put_file(key, passages)
        return key

    def discard_input(self, job_id: str) -> None:
        self._jobs.store.delete(self._jobs.key(job_id, PASSAGES))

    def create(
        self,
        job_id: str,
        kind: Literal["ingest", "rebuild"],
        domain: str,
        *,
        input: str | None,
        index: IndexConfig | None,
    ) -> JobInfo:
        """Record a pending job and start it if this process has room (blocking: store writes)."""
        replacing = self._registry.live(domain).index_version
        record = JobRecord(
            id=job_id,
            kind=kind,
            domain=domain,
            input=input,
            replacing=replacing,
            index=dataclasses.asdict(index) if index is not None else None,
        )
        record = self._jobs.create(record)
        log.info("job %s: %s of domain %s", job_id, kind, domain)
        self.pump()
        return self.get(job_id)

    def rebuild(self, domain: str) -> JobInfo:
        """Build `domain`'s index again: from its live passages (with its live adapter's passage encoder), or,
        when its first build never got that far, from the passages that build was given."""
        record = self._registry.get_domain(domain)
        if record.build_job is not None:
            try:
                current = self.get(record.build_job)
            except JobNotFound:  # lost before it was recorded
                current = None
            if current is not None and current.state not in FINISHED:
                raise BuildInProgress(f"job {current.id} is building domain {domain!r} ({current.state})")
        pointer = self._registry.live(domain)
        if pointer.passages_version is not None:
            kind, source, index = "rebuild", None, None
        else:
            previous = self._record(record.build_job) if record.build_job else None
            if previous is not None:
                source = previous.input
            else:  # lost before it was recorded: its passages were stored first, under its id
                source = self._jobs.key(record.build_job, PASSAGES) if record.build_job else None
            if source is None or not self._jobs.store.exists(source):
                raise NothingToRebuild(
                    f"the passages of domain {domain!r} are gone; delete it and create it again"
                )
            kind, index = "ingest", self._new_index(record.settings.get("retrieval") or "dense")
        job_id = new_version_id()

        def point(current):
            if current.build_job != record.build_job:
                return None
            return current.model_copy(update={"build_job": job_id})

        if self._registry.update_domain(domain, point).build_job != job_id:
            raise BuildInProgress(f"another build of domain {domain!r} started meanwhile")
        return self.create(job_id, kind, domain, input=source, index=index)

    # --- reading --------------------------------------------------------------------------------------------

    def get(self, job_id: str) -> JobInfo:
        with self._lock:
            local = self._local.get(job_id)
        if local is not None:
            return _info(local, self._work_dir)
        return self._jobs.get(job_id).info()

    def not_ready(self, domain: str) -> Exception:
        """Why `domain` has no index to answer from: its build is under way (503 index_not_ready) or failed
        (409 domain_build_failed, with the reason). Blocking: store reads."""
        try:
            job_id = self._registry.get_domain(domain).build_job
        except DomainNotFound as exc:
            return exc
        if job_id is None:
            return IndexNotReady(f"domain {domain!r} has no index yet")
        try:
            info = self.get(job_id)
        except JobNotFound:
            return DomainBuildFailed(
                f"domain {domain!r} has no index: its build job {job_id} was lost "
                f"before it started; rebuild (POST /admin/domains/{domain}/rebuild) or "
                "delete it"
            )
        if info.state in FINISHED:
            if info.state == "succeeded":
                return IndexNotReady(f"domain {domain!r} has no live index")
            return DomainBuildFailed(
                f"domain {domain!r} has no index: its build job {job_id} {info.state}"
                f" ({info.error}); rebuild (POST /admin/domains/{domain}/rebuild) or "
                "delete it"
            )
        return IndexNotReady(
            f"domain {domain!r} has no index yet: job {job_id} is building it "
            f"({info.state}, {info.progress:.0%})"
        )

    def building(self) -> list[str]:
        """Domains whose first index a job of this process is building."""
        with self._lock:
            locals_ = list(self._local.values())
        building = [local for local in locals_ if local.record.kind == "ingest"]
        return sorted(
            {local.record.domain for local in building if _info(local, self._work_dir).state not in FINISHED}
        )

    def scratch(self) -> tuple[list[Path], set[Path]]:
        """This server's job scratch directories, and those its jobs use now (for gc)."""
        with self._lock:
            held = list(self._local.values())
        candidates = [*self._work_dir.glob("inputs/*"), *self._work_dir.glob("rebuilds/*")]
        in_use = {self.input_dir(local.record.id) for local in held}
        in_use |= {self._work_dir / "rebuilds" / local.record.domain for local in held}
        return candidates, in_use

    def active_for(self, domain: str) -> list[JobRecord]:
        """Pending and running jobs of `domain` on any server (blocking: store reads)."""
        found = []
        for job_id in self._jobs.active():
            record = self._record(job_id)
            if record is not None and record.domain == domain and not record.finished:
                found.append(record)
        return found

    # --- the poller and the jobs' threads -------------------------------------------------------------------

    def sweep(self) -> None:
        """One round: write progress and leases of the jobs running here, record those that ended, start
        pending ones. Called by the poller; a store error leaves the rest for the next round."""
        with self._lock:
            locals_ = list(self._local.values())
        for local in locals_:
            if local.failure is not None:
                self._back_or_fail(local, local.failure)
            elif local.rebuild is not None and local.rebuild.status.finished:
                self._settle(local)
            elif local.rebuild is not None and time.monotonic() - local.written >= _WRITE_EVERY_S:
                self._write_progress(local)
        self.pump()
        self._sweep_inputs()

    def pump(self) -> None:
        """Start pending jobs (this server's and those of servers that stopped) while there is room, oldest
        first by creation time (ids sort only to the second)."""
        with self._lock:
            if len(self._local) >= self._max_concurrent:
                return
        startable = []
        for job_id in self._jobs.active():
            with self._lock:
                if job_id in self._local:
                    continue
            record = self._record(job_id)
            if record is None:
                continue
            if record.finished:  # its marker outlived a failed delete
                self._jobs.store.delete(f"{ACTIVE_PREFIX}{job_id}")
            elif _startable(record):
                startable.append(record)
        for record in sorted(startable, key=lambda r: (r.created_at, r.id)):
            job_id = record.id
            with self._lock:  # held here from now on: no other thread of this process starts it too
                if len(self._local) >= self._max_concurrent:
                    return
                if job_id in self._local:
                    continue
                local = self._local[job_id] = _Local(record)
            self._start(local)

    def cancel(self, domain: str, timeout: float = 30.0) -> list[JobRecord]:
        """Cancel the jobs of `domain` running here; returns the active jobs of other servers (the caller
        must not delete the domain under them)."""
        with self._lock:
            mine = [local for local in self._local.values() if local.record.domain == domain]
        for local in mine:
            if local.rebuild is not None:
                local.rebuild.cancel()
                local.rebuild.wait(timeout)
            self._settle(local, cancelled=True)
        elsewhere = []
        for record in self.active_for(domain):
            with self._lock:
                here = record.id in self._local
            if here:
                continue
            if _startable(record):  # nobody runs it: cancel it in the store
                self._jobs.update(
                    record.id, lambda r: _ended(r, "cancelled", "job_cancelled", "its domain was deleted")
                )
            else:
                elsewhere.append(record)
        return elsewhere

    def stop(self) -> None:
        """Stop the jobs running here; they go back to pending, and the next start (here or elsewhere)
        resumes them."""
        with self._lock:
            locals_ = list(self._local.values())
        for local in locals_:
            local.stopping = True
            if local.rebuild is not None:
                local.rebuild.cancel()
        for local in locals_:
            if local.rebuild is not None:
                local.rebuild.wait(15)
            self._settle(local)

    # --- internals ------------------------------------------------------------------------------------------

    def _record(self, job_id: str) -> JobRecord | None:
        try:
            return self._jobs.get(job_id)
        except JobNotFound:
            return None

    def _start(self, local: _Local) -> None:
        """Claim a pending job (or one whose server stopped) and start its rebuild here."""
        record = local.record
        crashed = record.state == "running"

        def take(current: JobRecord) -> JobRecord | None:
            if not _startable(current):
                return None
            current.crashes += current.state == "running"
            if current.crashes > self._max_crashes:
                return _ended(
                    current,
                    "failed",
                    "server_died",
                    f"the servers running it stopped {current.crashes} times",
                )
            current.state, current.owner = "running", self._owner
            current.lease_until = _now() + timedelta(seconds=self._lease_s)
            current.started_at = current.started_at or _now()
            current.retry_at = None
            return current

        try:
            claimed = self._jobs.update(record.id, take)
        except StoreError as exc:
            log.warning("job %s could not be started: %s", record.id, exc)
            claimed = None
        if claimed is None or claimed.owner != self._owner or claimed.state != "running":
            with self._lock:
                self._local.pop(record.id, None)
            return
        local.record, local.written = claimed, time.monotonic()
        try:
            if crashed and self._done_before(local):
                return
            spec = self._spec(claimed)
        except Exception as exc:  # the store went away, the live adapter is gone, ...
            log.warning("job %s could not be prepared: %s", claimed.id, exc)
            local.failure = exc
            self._back_or_fail(local, exc)
            return

        def on_success(result: RebuildResult) -> None:
            self._metrics.rebuild_seconds.labels(claimed.kind).observe(result.seconds)
            self._metrics.passages_encoded.labels(self._metrics.domain(claimed.domain)).inc(
                result.info.passage_count
            )
            self._on_live(claimed.domain)
            log.info(
                "domain %s is ready: index %s live (job %s, %.1fs)",
                claimed.domain,
                result.index_version,
                claimed.id,
                result.seconds,
            )

        # A cancelled build (its domain is being deleted) has nothing to save: its worker gets 2 s to stop.
        local.rebuild = RebuildJob(
            spec, self._versions, self._work_dir / "rebuilds", on_success=on_success, cancel_grace_s=2.0
        )
        local.rebuild.start()
        log.info(
            "job %s: %s of domain %s started%s",
            claimed.id,
            claimed.kind,
            claimed.domain,
            " again after its server stopped" if crashed else "",
        )

    def _done_before(self, local: _Local) -> bool:
        """A job taken over from a server that stopped may have moved the live index already."""
        record = local.record
        pointer = self._registry.live(record.domain)
        if pointer.index_version is None or pointer.index_version == record.replacing:
            return False
        result = {"index_version": pointer.index_version, "passages_version": pointer.passages_version}
        self._jobs.update(record.id, lambda r: _ended(r, "succeeded", None, None, result), owner=self._owner)
        self._forget(local)
        self._on_live(record.domain)
        return True

    def _spec(self, record: JobRecord) -> RebuildSpec:
        """What to build: the job's passages (downloaded unless the upload is still here) or the live ones,
        encoded with the domain's live adapter."""
        passages = None
        directory = self.input_dir(record.id)
        if record.input is not None:
            passages = directory / PASSAGES
            if not passages.exists():
                directory.mkdir(parents=True, exist_ok=True)
                self._jobs.store.get_file(record.input, passages)
        adapter_dir = adapter_version = None
        if record.kind == "rebuild":
            adapter_version = self._registry.live(record.domain).adapter_version
            if adapter_version is not None:
                adapter_dir = directory / "adapter"
                shutil.rmtree(adapter_dir, ignore_errors=True)
                adapters = AdapterRegistry(self._jobs.store)
                adapters.fetch(
                    adapters.ref(record.domain, adapter_version),
                    adapter_dir,
                    expected_fingerprint=self._fingerprint,
                )
        index = IndexConfig(**record.index) if record.index is not None else None
        return RebuildSpec(
            domain=record.domain,
            backbone=self._backbone,
            passages=passages,
            index=index,
            adapter_dir=adapter_dir,
            adapter_version=adapter_version,
            encode=self._encode,
        )

    def _write_progress(self, local: _Local) -> None:
        info = _info(local, self._work_dir)

        def renew(record: JobRecord) -> JobRecord:
            record.progress = info.progress
            record.lease_until = _now() + timedelta(seconds=self._lease_s)
            return record

        try:
            written = self._jobs.update(local.record.id, renew, owner=self._owner)
        except StoreError as exc:
            log.warning("job %s: progress not recorded: %s", local.record.id, exc)
            return
        if written is None:  # another server took it over (this one was presumed gone)
            log.warning("job %s was taken over by another server; stopping it here", local.record.id)
            local.rebuild.cancel()
            with self._lock:
                self._local.pop(local.record.id, None)
            return
        local.record, local.written = written, time.monotonic()

    def _settle(self, local: _Local, *, cancelled: bool = False) -> None:
        """Record how a job ended here: done, failed, cancelled, or back to pending (store outage, this server
        stopping). Leaves it for the next sweep when the store does not answer."""
        rebuild = local.rebuild
        status = rebuild.status if rebuild is not None else RebuildState.CANCELLED
        try:
            if status is RebuildState.SUCCEEDED:
                summary = _summary(rebuild.result(timeout=0))
                self._jobs.update(
                    local.record.id, lambda r: _ended(r, "succeeded", None, None, summary), owner=self._owner
                )
            elif status is RebuildState.CANCELLED and local.stopping:
                self._back_or_fail(local, None)
                return
            elif status is RebuildState.FAILED and rebuild.error_code == "store_unavailable":
                self._back_or_fail(local, rebuild)
                return
            elif status is RebuildState.CANCELLED or cancelled:
                self._jobs.update(
                    local.record.id,
                    lambda r: _ended(r, "cancelled", "job_cancelled", "its domain was deleted"),
                    owner=self._owner,
                )
            else:
                code, error = rebuild.error_code, _public(rebuild.error, self._work_dir)
                self._jobs.update(
                    local.record.id, lambda r: _ended(r, "failed", code, error), owner=self._owner
                )
        except StoreError as exc:
            log.warning("job %s ended %s, which is not recorded yet: %s", local.record.id, status.value, exc)
            return
        self._forget(local)

    def _back_or_fail(self, local: _Local, cause: RebuildJob | Exception | None) -> None:
        """Back to pending (to start again later), or failed once its store outages exceed _MAX_RETRIES.
        `cause` None: this server stops (the job resumes at the next start, not counted)."""
        error = None if cause is None else (cause.error if isinstance(cause, RebuildJob) else str(cause))
        transient = (
            cause is None
            or (getattr(cause, "error_code", None) or getattr(cause, "code", None)) == "store_unavailable"
        )

        def back(record: JobRecord) -> JobRecord:
            if cause is not None and (record.retries >= _MAX_RETRIES or not transient):
                code = "store_unavailable" if transient else getattr(cause, "code", "job_failed")
                return _ended(record, "failed", code, _public(error, self._work_dir))
            if cause is not None:
                record.retries += 1
                record.retry_at = _now() + timedelta(seconds=min(2**record.retries, 60))
                record.error, record.error_code = _public(error, self._work_dir), "store_unavailable"
            record.state, record.owner, record.lease_until = "pending", None, None
            return record

        try:
            self._jobs.update(local.record.id, back, owner=self._owner)
        except StoreError as exc:  # the next sweep tries again
            log.warning("job %s could not be put back yet: %s", local.record.id, exc)
            return
        self._forget(local)

    def _forget(self, local: _Local) -> None:
        with self._lock:
            self._local.pop(local.record.id, None)
        shutil.rmtree(self.input_dir(local.record.id), ignore_errors=True)

    def _sweep_inputs(self) -> None:
        """Local input directories of jobs not held here (taken over elsewhere, or left by a crash)."""
        inputs = self._work_dir / "inputs"
        if not inputs.is_dir():
            return
        with self._lock:
            held = set(self._local)
        for directory in inputs.iterdir():
            if directory.name in held or time.time() - directory.stat().st_mtime < 3600:
                continue  # an upload still being received has no job yet
            shutil.rmtree(directory, ignore_errors=True)


def _startable(record: JobRecord) -> bool:
    if record.state == "pending":
        return record.retry_at is None or record.retry_at <= _now()
    if record.state != "running":
        return False
    return record.lease_until is None or record.lease_until < _now() or owner_is_dead_here(record.owner)


def _ended(
    record: JobRecord,
    state: JobState,
    code: str | None,
    error: str | None,
    result: dict[str, Any] | None = None,
) -> JobRecord:
    record.state, record.error_code, record.error, record.result = state, code, error, result
    record.progress = 1.0 if state == "succeeded" else record.progress
    record.finished_at, record.owner, record.lease_until, record.retry_at = _now(), None, None, None
    return record


def _info(local: _Local, work_dir: Path) -> JobInfo:
    """A job held here, as its rebuild reports it now (its error without the server's paths)."""
    record, rebuild = local.record, local.rebuild
    if rebuild is None or record.finished:
        return record.info()
    progress = rebuild.progress
    if progress.stage == "encoding":
        fraction = 0.15 + 0.75 * progress.fraction
    else:
        fraction = _STAGE_PROGRESS.get(progress.stage, 0.0)
    state = "running" if not rebuild.status.finished else rebuild.status.value
    if (rebuild.status is RebuildState.FAILED and rebuild.error_code == "store_unavailable") or (
        rebuild.status is RebuildState.CANCELLED and local.stopping
    ):
        state = "pending"  # to be started again
    error = None if rebuild.error is None else f"{rebuild.error_code}: {_public(rebuild.error, work_dir)}"
    succeeded = rebuild.status is RebuildState.SUCCEEDED
    return JobInfo(
        id=record.id,
        kind=record.kind,
        domain=record.domain,
        state=state,
        progress=1.0 if succeeded else round(fraction, 3),
        error=error,
        result=_summary(rebuild.result(timeout=0)) if succeeded else None,
    )


def _summary(result: RebuildResult) -> dict[str, Any]:
    return {
        "index_version": result.index_version,
        "passages_version": result.passages_version,
        "passages": result.info.passage_count,
        "seconds": result.seconds,
    }


def _public(error: str | None, work_dir: Path) -> str | None:
    """An error message without the server's scratch paths (clients see it)."""
    if error is None:
        return None
    return error.replace(f"{work_dir.resolve()}/", "").replace(f"{work_dir}/", "")

"""Asynchronous index rebuilds: encode and index in a background worker process, publish, flip the pointer.

A `RebuildJob` runs in three places:

- a **worker process** (multiprocessing "spawn": a fresh interpreter, no forked torch or FAISS state) loads
  the backbone, attaches the given adapter set, reads or chunks the passages, encodes them (resumable by
  shard) and writes the index directory. It reports progress over a pipe and polls a cancel event between
  batches.
- a **monitor thread** in the calling process waits on the pipe and the process sentinel at once, so a worker
  that dies (killed, out of memory, segfault) is noticed at once instead of hanging the job. When the worker
  is done it publishes the new version(s) and moves the live pointer by compare-and-swap. It does I/O only.
- the **caller** reads `status`/`progress`/`error`, `cancel()`s, or `result()`s; nothing blocks an event loop.

Queries keep using the old version throughout: nothing live is touched until the pointer flips, and a failed
or cancelled rebuild leaves it where it was, with `error` saying why.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.synchronize
import shutil
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_for
from pathlib import Path

import torch

from backbone import Backbone, BackboneConfig
from storage import DomainNotFound, new_version_id

from .builder import BuildInfo, IndexConfig, build_index
from .chunking import ChunkConfig, load_corpus, read_passages
from .encoder import EncodeConfig
from .errors import EmptyCorpus, IndexingError, RebuildCancelled, RebuildFailed
from .publish import publish_build
from .versions import IndexVersions

log = logging.getLogger(__name__)


class RebuildState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (RebuildState.SUCCEEDED, RebuildState.FAILED, RebuildState.CANCELLED)


@dataclass(frozen=True)
class RebuildProgress:
    """Where a rebuild is: stage (pending, preparing, starting, loading, reading, encoding, indexing,
    publishing, flipping, done) and, for encoding and indexing, passages done of total."""

    stage: str = "pending"
    done: int = 0
    total: int = 0

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0


@dataclass(frozen=True)
class RebuildSpec:
    """What to rebuild.

    `passages`: a new corpus (JSONL, text or markdown; chunked with `chunk`), published as a new passages
    version when the build succeeds; None rebuilds the domain's live passages version. `adapter_dir`: an
    adapter set saved by `Backbone.save_adapter_set` whose passage encoder encodes the passages (None: the
    base encoder); `adapter_version` names it in the build config and must be the domain's live adapter for
    the flip. `flip=False` publishes without moving the live pointer (training switches its own handle);
    `publish=False` keeps the build local only (the result's `directory`). `index=None` keeps the live index's
    settings.
    """

    domain: str
    backbone: BackboneConfig
    passages: Path | None = None
    adapter_dir: Path | None = None
    adapter_version: str | None = None
    chunk: ChunkConfig = ChunkConfig()
    index: IndexConfig | None = None
    encode: EncodeConfig = EncodeConfig(progress=False)
    flip: bool = True
    publish: bool = True


@dataclass(frozen=True)
class RebuildResult:
    domain: str
    index_version: str | None  # None when the build was not published
    passages_version: str | None  # the passages the index was built from (new or the live one)
    directory: Path  # the local index directory (in the version cache once published)
    info: BuildInfo
    flipped: bool
    seconds: float


@dataclass(frozen=True)
class _WorkerTask:
    """Everything the worker needs, picklable (plain paths and frozen configs)."""

    backbone: BackboneConfig
    passages: Path
    chunk: ChunkConfig | None  # None: canonical passages, read as they are
    adapter_dir: Path | None
    adapter_version: str | None
    passages_version: str | None
    index: IndexConfig
    encode: EncodeConfig
    output: Path
    shards: Path
    build_id: str


def _worker_main(task: _WorkerTask, conn: Connection, cancel: multiprocessing.synchronize.Event) -> None:
    """Entry point of the worker process: build the index directory, report over `conn`, never raise."""
    try:
        if task.encode.threads is not None:
            torch.set_num_threads(task.encode.threads)  # before any parallel region starts
        conn.send(("progress", "loading", 0, 0))
        backbone = Backbone.load(task.backbone)
        adapter = None
        if task.adapter_dir is not None:
            adapter = f"rebuild-{task.adapter_version or 'adapter'}"
            backbone.load_adapter_set(adapter, task.adapter_dir)
        conn.send(("progress", "reading", 0, 0))
        passages = load_corpus(task.passages, task.chunk) if task.chunk else read_passages(task.passages)
        if not passages:
            raise EmptyCorpus(f"{task.passages} holds no passages")
        info = build_index(
            backbone,
            passages,
            task.output,
            build_id=task.build_id,
            adapter=adapter,
            adapter_version=task.adapter_version,
            passages_version=task.passages_version,
            config=task.index,
            encode=task.encode,
            work_dir=task.shards,
            on_progress=lambda stage, done, total: conn.send(("progress", stage, done, total)),
            should_stop=cancel.is_set,
        )
        conn.send(("done", info.to_dict()))
    except RebuildCancelled as exc:
        conn.send(("cancelled", str(exc)))
    except BaseException as exc:  # the parent must hear why, whatever it was
        code = getattr(exc, "code", RebuildFailed.code)
        conn.send(("failed", code, f"{type(exc).__name__}: {exc}", traceback.format_exc()))
    finally:
        conn.close()


class RebuildJob:
    """One rebuild of one domain's index. `start()` it, then poll `status`/`progress` or `result()`."""

    def __init__(
        self,
        spec: RebuildSpec,
        versions: IndexVersions | None,
        work_dir: Path,
        *,
        on_success: Callable[[RebuildResult], None] | None = None,
        cancel_grace_s: float = 10.0,
        stall_timeout_s: float | None = 900.0,
    ):
        """`versions` is required to publish or flip (and to rebuild the live passages); `work_dir` holds the
        job's scratch files and the encoder's resumable shards. `on_success` runs in the monitor thread after
        the flip (e.g. open the new version for the requests that follow). A worker silent for
        `stall_timeout_s` is killed and the job fails; `cancel_grace_s` is how long a cancelled worker may
        take to stop by itself before it is killed."""
        if (spec.publish or spec.flip or spec.passages is None) and versions is None:
            raise ValueError("publishing, flipping or rebuilding live passages needs an IndexVersions")
        if spec.flip and not spec.publish:
            raise ValueError("flip=True needs publish=True: only published versions can go live")
        self.spec = spec
        self.build_id = new_version_id()
        self._versions = versions
        self._work_dir = Path(work_dir) / spec.domain
        self._job_dir = self._work_dir / f"job-{self.build_id}"
        self._on_success = on_success
        self._cancel_grace_s = cancel_grace_s
        self._stall_timeout_s = stall_timeout_s
        self._context = multiprocessing.get_context("spawn")
        self._cancel_event = self._context.Event()
        self._cancel_requested = threading.Event()
        self._finished = threading.Event()
        self._lock = threading.RLock()  # cancel() may finish a job that never started while holding it
        self._status = RebuildState.PENDING
        self._progress = RebuildProgress()
        self._error: str | None = None
        self._error_code: str | None = None
        self._result: RebuildResult | None = None
        self._index_version: str | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._thread: threading.Thread | None = None
        self._started_at: float | None = None

    # --- what callers see -----------------------------------------------------------------------------------

    @property
    def domain(self) -> str:
        return self.spec.domain

    @property
    def status(self) -> RebuildState:
        return self._status

    @property
    def progress(self) -> RebuildProgress:
        return self._progress

    @property
    def error(self) -> str | None:
        """Why the rebuild failed or was cancelled (None while running or after success)."""
        return self._error

    @property
    def error_code(self) -> str | None:
        """The stable code of the error that ended the rebuild (e.g. malformed_passages, worker_died)."""
        return self._error_code

    @property
    def pid(self) -> int | None:
        """The worker process id while it exists."""
        return self._process.pid if self._process is not None else None

    @property
    def index_version(self) -> str | None:
        """The new index version once published (also when the flip then failed), else None."""
        return self._index_version

    def start(self) -> RebuildJob:
        """Start the monitor thread, which starts the worker. A job cancelled before start stays cancelled."""
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("a rebuild job starts once")
            if self._status.finished:
                return self
            self._started_at = time.perf_counter()
            self._status = RebuildState.RUNNING
            self._progress = RebuildProgress("preparing")
            self._thread = threading.Thread(
                target=self._run, name=f"rebuild-{self.domain}-{self.build_id}", daemon=True
            )
            self._thread.start()
        return self

    def cancel(self) -> bool:
        """Ask the rebuild to stop. True if it will end cancelled; False if it finished (or flipped)."""
        with self._lock:
            if self._status.finished or self._progress.stage in ("flipping", "done"):
                return False
            self._cancel_requested.set()
            self._cancel_event.set()
            if self._thread is None:
                self._finish(RebuildState.CANCELLED, RebuildCancelled.code, "cancelled before it started")
            return True

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job finished (True) or `timeout` seconds passed (False)."""
        return self._finished.wait(timeout)

    def result(self, timeout: float | None = None) -> RebuildResult:
        """The result of a succeeded rebuild; raises RebuildFailed / RebuildCancelled (with the why), or
        TimeoutError if it is still running after `timeout` seconds."""
        if not self._finished.wait(timeout):
            raise TimeoutError(f"rebuild of {self.domain} still {self._progress.stage} after {timeout}s")
        if self._status is RebuildState.SUCCEEDED:
            return self._result
        if self._status is RebuildState.CANCELLED:
            raise RebuildCancelled(f"rebuild of {self.domain} cancelled: {self._error}")
        raise RebuildFailed(f"rebuild of {self.domain} failed: {self._error}")

    # --- the monitor thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        status, code, error = RebuildState.SUCCEEDED, None, None
        try:
            self._execute()
        except RebuildCancelled as exc:
            status, code, error = RebuildState.CANCELLED, exc.code, str(exc)
        except (IndexingError, DomainNotFound) as exc:  # typed: the message says it all
            status, code, error = RebuildState.FAILED, exc.code, str(exc)
        except Exception as exc:  # store errors and the unexpected: the job must end, and say why
            log.exception("rebuild of %s failed", self.domain)
            status, code, error = (
                RebuildState.FAILED,
                getattr(exc, "code", RebuildFailed.code),
                f"{type(exc).__name__}: {exc}",
            )
        self._clean_up(status)
        if status is RebuildState.SUCCEEDED and self._on_success is not None:
            try:
                self._on_success(self._result)
            except Exception:  # the new version is live on the store either way; say so, do not unflip
                log.exception("on_success callback of the rebuild of %s failed", self.domain)
        self._finish(status, code, error)

    def _clean_up(self, status: RebuildState) -> None:
        """Remove the job's scratch files, keeping only a result directory that still lives in them."""
        keep = self._result.directory if status is RebuildState.SUCCEEDED else None
        if keep is not None and self._job_dir in keep.parents:
            shutil.rmtree(self._job_dir / "input", ignore_errors=True)
        else:
            shutil.rmtree(self._job_dir, ignore_errors=True)

    def _execute(self) -> None:
        spec = self.spec
        pointer = self._versions.live(spec.domain) if self._versions is not None else None
        base_index = pointer.index_version if pointer is not None else None
        passages_version = None
        if spec.passages is not None:
            passages_file, chunk = Path(spec.passages), spec.chunk
        else:
            passages_version = pointer.passages_version
            if passages_version is None:
                raise RebuildFailed(
                    f"domain {spec.domain!r} has no live passages to rebuild from; give passages"
                )
            passages_file = self._versions.fetch_passages(
                spec.domain, passages_version, self._job_dir / "input"
            )
            chunk = None
        index_config = spec.index
        if index_config is None:
            index_config = (
                self._versions.build_info(spec.domain, base_index).config
                if base_index is not None
                else IndexConfig()
            )
        self._check_cancelled()
        output = self._job_dir / "index"
        shards = _ShardMirror.of(self, self._work_dir / "shards")
        if shards is not None:
            shards.download()
        task = _WorkerTask(
            backbone=spec.backbone,
            passages=passages_file,
            chunk=chunk,
            adapter_dir=spec.adapter_dir,
            adapter_version=spec.adapter_version,
            passages_version=passages_version,
            index=index_config,
            encode=spec.encode,
            output=output,
            shards=self._work_dir / "shards",
            build_id=self.build_id,
        )
        info = self._run_worker(task, shards)
        if shards is not None:
            shards.drop()
        self._check_cancelled()
        if not spec.publish:
            self._succeed(
                RebuildResult(spec.domain, None, passages_version, output, info, False, self._elapsed())
            )
            return
        self._set_progress("publishing")
        published = publish_build(
            self._versions,
            spec.domain,
            output,
            passages=output / "passages.jsonl" if spec.passages is not None else None,
            source=str(spec.passages),
            passages_version=passages_version,
        )
        version, passages_version = published.index_version, published.passages_version
        self._index_version = version
        directory = published.directory
        info = BuildInfo.read(directory)
        flipped = False
        if spec.flip:
            with self._lock:
                self._check_cancelled()
                self._progress = RebuildProgress("flipping")
            self._versions.make_live(
                spec.domain,
                version,
                passages_version=passages_version,
                replacing=base_index,
                adapter_version=spec.adapter_version,
            )
            flipped = True
            log.info("domain %s now serves index %s", spec.domain, version)
        self._succeed(
            RebuildResult(spec.domain, version, passages_version, directory, info, flipped, self._elapsed())
        )

    def _run_worker(self, task: _WorkerTask, shards: _ShardMirror | None = None) -> BuildInfo:
        """Start the worker and follow it until it reports, dies, stalls or is cancelled; meanwhile copy the
        shards it finishes to the store (`shards`)."""
        receiver, sender = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_worker_main,
            args=(task, sender, self._cancel_event),
            name=f"rebuild-{self.domain}",
            daemon=True,
        )
        self._set_progress("starting")
        process.start()
        self._process = process
        sender.close()  # the worker holds the only writing end now: EOF means it is gone
        last_heard = time.monotonic()
        cancel_deadline = None
        try:
            while True:
                ready = wait_for([receiver, process.sentinel], timeout=0.5)
                if shards is not None:
                    shards.upload()
                if receiver in ready:
                    try:
                        message = receiver.recv()
                    except EOFError:  # the worker is gone without a last word: killed or crashed
                        process.join(timeout=5)
                        raise _WorkerError(
                            "worker_died", _death_reason(process.pid, process.exitcode)
                        ) from None
                    last_heard = time.monotonic()
                    kind = message[0]
                    if kind == "progress":
                        self._set_progress(message[1], message[2], message[3])
                        continue
                    if kind == "done":
                        return BuildInfo.from_dict(message[1])
                    if kind == "cancelled":
                        raise RebuildCancelled(message[1])
                    log.error("rebuild worker of %s failed:\n%s", self.domain, message[3])
                    raise _WorkerError(message[1], message[2])
                if process.sentinel in ready:  # exited, and nothing left to read
                    process.join(timeout=5)
                    raise _WorkerError("worker_died", _death_reason(process.pid, process.exitcode))
                now = time.monotonic()
                if self._cancel_requested.is_set():
                    cancel_deadline = cancel_deadline or now + self._cancel_grace_s
                    if now > cancel_deadline:
                        _stop(process)
                        raise RebuildCancelled("cancelled; the worker did not stop in time and was killed")
                if self._stall_timeout_s is not None and now - last_heard > self._stall_timeout_s:
                    _stop(process)
                    raise _WorkerError(
                        "worker_stalled",
                        f"the worker sent nothing for {self._stall_timeout_s:.0f}s and was killed",
                    )
        finally:
            receiver.close()
            process.join(timeout=10)  # a worker that reported is exiting by itself
            if process.is_alive():
                _stop(process)

    # --- state ----------------------------------------------------------------------------------------------

    def _check_cancelled(self) -> None:
        if self._cancel_requested.is_set():
            raise RebuildCancelled("cancelled on request")

    def _set_progress(self, stage: str, done: int = 0, total: int = 0) -> None:
        self._progress = RebuildProgress(stage, done, total)

    def _elapsed(self) -> float:
        return round(time.perf_counter() - (self._started_at or time.perf_counter()), 3)

    def _succeed(self, result: RebuildResult) -> None:
        self._result = result
        self._progress = RebuildProgress("done", result.info.passage_count, result.info.passage_count)

    def _finish(self, status: RebuildState, code: str | None, error: str | None) -> None:
        with self._lock:
            self._error_code, self._error = code, error
            self._status = status
            self._process = None
        if status is not RebuildState.SUCCEEDED:
            log.warning("rebuild of %s %s: %s", self.domain, status.value, error)
        self._finished.set()


class _ShardMirror:
    """The encoder's finished shards of a build encoding on Ray, copied to the store as they appear
    (`shards/<domain>/shards-<identity>/...`), so that the build resumed on another host (a job taken over by
    another server) skips what was encoded; dropped once the build is done. A local build, and a run's
    mid-run refresh (never resumed as such), keep them on their disk only."""

    def __init__(self, store, domain: str, directory: Path):
        self.store, self.directory = store, directory
        self.prefix = f"shards/{domain}/"
        self._in_store: set[str] = set()  # relative paths
        self._downloaded: set[str] = set()  # shard directories

    @classmethod
    def of(cls, job: RebuildJob, directory: Path) -> _ShardMirror | None:
        if job.spec.encode.ray is None or not job.spec.publish:
            return None
        return cls(job._versions.registry.store, job.domain, directory)

    def download(self) -> None:
        """Every shard directory of the domain in the store (the worker takes the one of its identity)."""
        for info in self.store.list(self.prefix):
            relative = info.key[len(self.prefix) :]
            target = self.directory / relative
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                self.store.get_file(info.key, target)
            self._in_store.add(relative)
            self._downloaded.add(relative.partition("/")[0])

    def upload(self) -> None:
        """Copy finished shards not copied yet (the encoder writes each by rename: never half a file)."""
        for path in sorted(self.directory.glob("shards-*/*")):
            relative = path.relative_to(self.directory).as_posix()
            if relative in self._in_store or path.name.startswith("."):
                continue
            if path.name != "identity.json" and path.suffix != ".npy":
                continue
            try:
                self.store.put_file(self.prefix + relative, path)
            except FileNotFoundError:  # the encoder finished and removed its shards meanwhile
                continue
            self._in_store.add(relative)

    def drop(self) -> None:
        """Once the build is done: delete the copies of the shard directory it used (the one it wrote to, or
        the downloaded one its encoder removed when it finished); other encoders' stay."""
        used = {relative.partition("/")[0] for relative in self._in_store}
        used = {name for name in used if name not in self._downloaded or not (self.directory / name).exists()}
        for relative in sorted(self._in_store):
            if relative.partition("/")[0] in used:
                self.store.delete(self.prefix + relative)


class _WorkerError(RebuildFailed):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def _death_reason(pid: int | None, exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"the rebuild worker (pid {pid}) was killed by {name} before it finished"
    return f"the rebuild worker (pid {pid}) exited with code {exitcode} before it finished"


def _stop(process: multiprocessing.process.BaseProcess) -> None:
    """Terminate, then kill if it does not go within a few seconds."""
    process.terminate()
    process.join(timeout=5)
    if process.is_alive():
        process.kill()
        process.join(timeout=5)

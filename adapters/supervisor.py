"""The run worker processes of a server and their lifecycle (`RunManager`).

`RunManager` (in the service process) supervises `max_concurrent` worker processes (multiprocessing "spawn":
a fresh interpreter each, never a forked torch). A worker loads the backbone once, then claims queued runs
from the store one at a time (`adapters.queue`) and executes them (`adapters.execution`). A worker that dies
is noticed at once by the manager's monitor thread (it waits on the process sentinels), which queues its run
again and starts a new worker; a whole host that died is noticed by the lease running out. It is also what
the service calls to submit, read and cancel runs, so that a submit wakes an idle worker at once.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.synchronize
import os
import secrets
import shutil
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_for
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters.execution import Workspace, execute
from adapters.frontend import RunFrontend
from adapters.lease import RunContext
from adapters.queue import claim_next, requeue
from adapters.records import RunRecord, RunStore, open_spec_store, owner_is_dead_here, owner_token
from adapters.spec import RunState
from storage.errors import StoreError
from storage.store import ObjectStore

if TYPE_CHECKING:
    from backbone import BackboneConfig
    from indexing.ray_encoding import RayEncoding

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs, picklable."""

    store: Any  # an ObjectStore that pickles (LocalStore), or a storage.StoreConfig
    backbone_config: BackboneConfig
    work_dir: Path
    token: str
    lease_s: float
    poll_s: float
    max_crashes: int
    threads: int | None = None  # torch threads of the worker (None: torch's default)
    ray_encoding: RayEncoding | None = None  # the runs' index builds encode on Ray Data (None: here)


def worker_main(
    spec: WorkerSpec,
    stop: multiprocessing.synchronize.Event,
    wake: multiprocessing.synchronize.Event,
    parent_pid: int,
) -> None:
    """A worker process: load the backbone, then claim and execute runs until told to stop."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s [worker] %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the manager decides
    if spec.threads is not None:
        import torch

        torch.set_num_threads(spec.threads)
    runs = RunStore(open_spec_store(spec.store))
    owner = owner_token(spec.token)
    workspace = Workspace(
        spec.backbone_config, worker_scratch(spec.work_dir, spec.token), ray_encoding=spec.ray_encoding
    )
    workspace.backbone()

    def should_stop() -> bool:
        return stop.is_set() or os.getppid() != parent_pid

    delay = 0.0
    try:
        while not should_stop():
            try:
                record = claim_next(runs, owner, lease_s=spec.lease_s, max_crashes=spec.max_crashes)
            except Exception:  # store down, an unreadable record: a worker outlives it and tries again
                delay = min(max(delay * 2, 1.0), 30.0)
                log.warning("claiming a run failed; trying again in %.0fs", delay, exc_info=True)
                stop.wait(delay)
                continue
            delay = 0.0
            if record is None:
                wake.wait(spec.poll_s)
                wake.clear()
                continue
            ctx = RunContext(runs, record, owner, lease_s=spec.lease_s, should_stop=should_stop)
            try:
                execute(ctx, workspace)
            except Exception:  # the run's end (or its return to the queue) is recorded; take the next one
                continue
    finally:
        shutil.rmtree(workspace.work_dir, ignore_errors=True)


def worker_scratch(work_dir: Path, token: str) -> Path:
    """The local scratch directory of the worker process with `token` (removed when it ends or dies)."""
    return Path(work_dir) / f"worker-{token}"


@dataclass
class _Worker:
    token: str
    process: multiprocessing.process.BaseProcess
    started: float = field(default_factory=time.monotonic)

    @property
    def owner(self) -> str:
        return f"{socket.gethostname()}/{self.process.pid}/{self.token}"


class RunManager(RunFrontend):
    """Queues adaptation runs and runs them in `max_concurrent` worker processes (one by default)."""

    def __init__(
        self,
        store: ObjectStore,
        backbone_config: BackboneConfig,
        work_dir: Path,
        *,
        max_concurrent: int = 1,
        store_config: Any = None,
        lease_s: float = 120.0,
        poll_s: float = 1.0,
        stop_timeout_s: float = 60.0,
        max_crashes: int = 2,
        cuda_available: bool | None = None,
        threads: int | None = None,
        ray_encoding: RayEncoding | None = None,
    ):
        """`store_config` (a storage.StoreConfig) lets workers open stores that do not pickle (S3); a
        LocalStore travels as it is. `cuda_available` is what validation assumes about the workers' device
        (None: ask torch here). A run whose worker dies more than `max_crashes` times fails. `threads`: torch
        threads of each worker (None: torch's default, every core)."""
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be >= 1")
        super().__init__(store, cuda_available=cuda_available)
        self.backbone_config = backbone_config
        self.work_dir = Path(work_dir)
        self.max_concurrent = max_concurrent
        self._store_spec = store_config if store_config is not None else store
        self._lease_s, self._poll_s, self._stop_timeout_s = lease_s, poll_s, stop_timeout_s
        self._max_crashes = max_crashes
        self._threads = threads
        self._ray_encoding = ray_encoding
        self._context = multiprocessing.get_context("spawn")
        self._stop = self._context.Event()
        self._wake = self._context.Event()
        self._workers: list[_Worker] = []
        self._quick_deaths = 0  # workers in a row that died within a minute of their start
        self._monitor: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    # --- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Queue again the runs whose worker on this host is gone (a restart), then start the workers. With
        the store down, the workers take those runs over themselves once it is back."""
        with self._lock:
            if self._monitor is not None:
                raise RuntimeError("RunManager already started")
            try:
                for run_id in self.runs.active():
                    record = self.runs.get(run_id)
                    if record.state == RunState.RUNNING and owner_is_dead_here(record.owner):
                        requeue(
                            self.runs, run_id, reason="its worker is gone (restart); resuming", crashed=True
                        )
            except StoreError as exc:
                log.warning("could not queue again the runs of workers gone since the last start: %s", exc)
            self._quick_deaths = 0
            self._stop.clear()
            self._stopping.clear()
            self._workers = [self._spawn() for _ in range(self.max_concurrent)]
            self._monitor = threading.Thread(target=self._watch, name="run-workers", daemon=True)
            self._monitor.start()

    def stop(self) -> None:
        """Ask workers to stop (a running run checkpoints and goes back to the queue), wait, then end them."""
        with self._lock:
            if self._monitor is None:
                return
            self._stopping.set()
            self._stop.set()
            self._wake.set()
            deadline = time.monotonic() + self._stop_timeout_s
            for worker in self._workers:
                worker.process.join(max(deadline - time.monotonic(), 0.1))
                if worker.process.is_alive():
                    log.warning("run worker %s did not stop in time; terminating it", worker.process.pid)
                    worker.process.terminate()
                    worker.process.join(10)
                    if worker.process.is_alive():
                        worker.process.kill()
                        worker.process.join(5)
            self._monitor.join(10)
            self._monitor = None
            self._workers = []

    def scratch(self) -> tuple[list[Path], set[Path]]:
        """The workers' scratch directories under the work directory, and those of the workers alive now."""
        with self._lock:
            alive = {worker_scratch(self.work_dir, w.token) for w in self._workers if w.process.is_alive()}
        return list(self.work_dir.glob("worker-*")), alive

    @property
    def alive_workers(self) -> int:
        return sum(w.process.is_alive() for w in self._workers)

    def _spawn(self) -> _Worker:
        token = secrets.token_hex(4)
        spec = WorkerSpec(
            self._store_spec,
            self.backbone_config,
            self.work_dir,
            token,
            self._lease_s,
            self._poll_s,
            self._max_crashes,
            self._threads,
            self._ray_encoding,
        )
        # Not a daemon: a worker starts index-rebuild processes of its own, which daemons may not.
        process = self._context.Process(
            target=worker_main, args=(spec, self._stop, self._wake, os.getpid()), name=f"run-worker-{token}"
        )
        process.start()
        log.info("started run worker %s (pid %s)", token, process.pid)
        return _Worker(token, process)

    @property
    def supervisor(self) -> str:
        """`running`; `stopped` before start and after stop; `dead` when the thread that replaces dead
        workers ended while it should run (nothing replaces a dead worker then: `/readyz` says so)."""
        if self._monitor is None:
            return "stopped"
        return "running" if self._monitor.is_alive() else "dead"

    def _watch(self) -> None:
        """Supervise the workers until stopped. Nothing may end this thread: a store outage or anything
        unexpected is logged and the next round tries again."""
        while not self._stopping.is_set():
            try:
                self._replace_dead_workers()
            except Exception:
                log.exception("supervising the run workers failed; trying again")
                self._stopping.wait(1.0)

    def _replace_dead_workers(self) -> None:
        """Wait on the workers' sentinels; a worker that died has its scratch directory swept and its run
        queued again, and is replaced (after a pause that grows while workers keep dying young)."""
        workers = list(self._workers)
        wait_for([w.process.sentinel for w in workers], timeout=1.0)
        for worker in workers:
            if self._stopping.is_set():
                return
            if worker.process.is_alive():
                continue
            worker.process.join(1)
            code = worker.process.exitcode
            log.error("run worker %s (pid %s) died with exit code %s", worker.token, worker.process.pid, code)
            shutil.rmtree(worker_scratch(self.work_dir, worker.token), ignore_errors=True)
            try:
                self._release_runs_of(worker, f"worker pid {worker.process.pid} died (exit code {code})")
            except StoreError as exc:  # its replacement takes its runs over once the store is back
                log.warning("could not queue the runs of worker %s again: %s", worker.token, exc)
            self._quick_deaths = self._quick_deaths + 1 if time.monotonic() - worker.started < 60 else 0
            if self._quick_deaths > 1:
                pause = min(2.0 ** (self._quick_deaths - 1), 60.0)
                log.warning("run workers keep dying young; replacing this one in %.0fs", pause)
                if self._stopping.wait(pause):
                    return
            with self._lock:
                if self._stopping.is_set():
                    return
                self._workers[self._workers.index(worker)] = self._spawn()
            self._wake.set()

    def _submitted(self, record: RunRecord) -> None:
        self._wake.set()  # an idle worker claims it now rather than at its next poll

    def _cancelled(self, record: RunRecord) -> None:
        """Nothing to do here: a queued run is never claimed once cancelled, and a running one's worker
        reads the flag between micro-batches."""

    def _release_runs_of(self, worker: _Worker, reason: str) -> None:
        for run_id in self.runs.active():
            try:
                requeue(self.runs, run_id, reason=reason, owner=worker.owner, crashed=True)
            except Exception:
                log.exception("could not queue run %s again after its worker died", run_id)

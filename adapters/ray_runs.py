"""Adaptation runs on a Ray cluster (`runs.executor: ray`).

Each run executes in a detached Ray actor of its own, named after the run and created with the CPUs, GPUs
and memory the run asks for (`RunRequest.resources`). Ray does the rest of what the local executor does by
hand:

- placement: the actor waits in Ray's scheduler until a node has room; there is no queue of ours beside it.
  The store's queue marker only says which runs are not finished yet, so that a service started later (or
  another replica) can place a run whose actor is gone.
- retries: when the actor's worker process or node is lost, Ray restarts the actor (up to the run's crash
  budget), and the new one takes the run over and resumes it from its last checkpoint, as a local worker
  does. The store's crash count ends it as failed once the budget is spent.
- cancellation: a cancel sets the run's flag in the store, which the actor reads between micro-batches, so
  the work stops within one step; a run still waiting for room has its actor killed at once.

Detached: a run outlives the service process that submitted it, and a service restart leaves it training.
The store stays the source of truth for the run's state, events, checkpoints and versions.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters.errors import InvalidRun, LeaseLost
from adapters.execution import Workspace, execute
from adapters.frontend import RunFrontend
from adapters.lease import RunContext
from adapters.queue import claim, claimable
from adapters.records import RunRecord, RunStore, open_spec_store, owner_token
from adapters.spec import RunInfo, RunRequest, RunResources, RunState
from indexing.raycluster import RayCluster, connect
from storage.errors import StoreError
from storage.store import ObjectStore

if TYPE_CHECKING:
    from backbone import BackboneConfig
    from indexing.ray_encoding import RayEncoding

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActorSpec:
    """What a run's actor needs, picklable."""

    store: Any  # an ObjectStore that pickles (LocalStore), or a storage.StoreConfig
    backbone_config: BackboneConfig
    lease_s: float
    poll_s: float
    max_crashes: int
    ray_encoding: RayEncoding | None = None  # the run's index builds encode on Ray Data too


class RunActor:
    """Executes one run: claims it, executes it (resuming from its last checkpoint), then ends itself.

    The work happens on a thread of its own, so the actor is alive (and can be asked `state`) while it
    trains, and a restarted actor resumes the run from its constructor."""

    def __init__(self, spec: ActorSpec, run_id: str, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.spec, self.run_id = spec, run_id
        self._state = "starting"
        self._thread = threading.Thread(target=self._main, name=f"run-{run_id}", daemon=True)
        self._thread.start()

    def state(self) -> str:
        """starting, waiting (for the run to be claimable), running, or done."""
        return self._state

    def _main(self) -> None:
        runs = RunStore(open_spec_store(self.spec.store))
        owner = owner_token(f"ray-{self.run_id[-6:]}")
        scratch = Path(tempfile.mkdtemp(prefix="ragadapt-run-"))
        workspace = Workspace(self.spec.backbone_config, scratch, ray_encoding=self.spec.ray_encoding)
        try:
            while (record := self._claim(runs, owner)) is not None:
                self._state = "running"
                ctx = RunContext(runs, record, owner, lease_s=self.spec.lease_s)
                try:
                    execute(ctx, workspace)
                except LeaseLost:  # another worker holds the run now
                    return
                except Exception:  # the run's end, or its return to the queue, is recorded
                    log.info("run %s: execution ended with an error (recorded)", self.run_id, exc_info=True)
        finally:
            self._state = "done"
            shutil.rmtree(scratch, ignore_errors=True)
            self._end()

    def _claim(self, runs: RunStore, owner: str) -> RunRecord | None:
        """The run, claimed for this actor; None once it is finished. A run held by a worker whose lease has
        not run out yet (a lost node's, say) is waited for."""
        self._state = "waiting"
        delay = self.spec.poll_s
        while True:
            try:
                record = runs.get(self.run_id)
                if record.state.finished:
                    return None
                claimed = claim(
                    runs, self.run_id, owner, lease_s=self.spec.lease_s, max_crashes=self.spec.max_crashes
                )
                if claimed is not None:
                    return None if claimed.state.finished else claimed  # finished: out of crashes
                delay = self.spec.poll_s
            except StoreError as exc:
                delay = min(max(delay * 2, 1.0), 30.0)
                log.warning(
                    "run %s: the store did not answer (%s); trying again in %.0fs", self.run_id, exc, delay
                )
            time.sleep(delay)

    def _end(self) -> None:
        """Kill this actor for good: its run is over, and Ray must not restart it."""
        import ray

        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)


def actor_name(run_id: str) -> str:
    return f"run-{run_id}"


class RayRunManager(RunFrontend):
    """Runs submitted here execute on a Ray cluster, each in an actor of its own (see the module)."""

    def __init__(
        self,
        store: ObjectStore,
        backbone_config: BackboneConfig,
        cluster: RayCluster,
        *,
        resources: RunResources | None = None,
        store_config: Any = None,
        ray_encoding: RayEncoding | None = None,
        lease_s: float = 120.0,
        poll_s: float = 2.0,
        max_crashes: int = 2,
    ):
        """`store_config` (a storage.StoreConfig) lets actors open stores that do not pickle (S3); a
        LocalStore travels as it is (then every node must see its directory). `ray_encoding`: the runs'
        index builds encode on Ray Data too (its cluster addressed so that other processes join it)."""
        super().__init__(store, cuda_available=None, resources=resources or RunResources())
        self.cluster = cluster
        self._spec = ActorSpec(
            store_config if store_config is not None else store,
            backbone_config,
            lease_s,
            min(poll_s, lease_s / 4),
            max_crashes,
            ray_encoding,
        )
        self._poll_s = poll_s
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None
        self._actor_class: Any = None

    # --- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect to the cluster, then place every unfinished run that has no actor (runs submitted while
        no service ran, or whose actor Ray gave up on) and keep doing so."""
        import ray

        if self._monitor is not None:
            raise RuntimeError("RayRunManager already started")
        connect(self.cluster)
        self._cuda_available = ray.cluster_resources().get("GPU", 0) > 0
        self._actor_class = ray.remote(RunActor)
        self._stopping.clear()
        self._monitor = threading.Thread(target=self._watch, name="ray-runs", daemon=True)
        self._monitor.start()

    def stop(self) -> None:
        """Stop placing runs. The runs' actors go on training on the cluster (they are detached)."""
        if self._monitor is None:
            return
        self._stopping.set()
        self._monitor.join(10)
        self._monitor = None

    @property
    def supervisor(self) -> str:
        if self._monitor is None:
            return "stopped"
        return "running" if self._monitor.is_alive() else "dead"

    @property
    def alive_workers(self) -> int:
        return 0  # no worker processes here: the runs' actors live on the cluster

    def scratch(self) -> tuple[list[Path], set[Path]]:
        return [], set()  # actors keep their scratch in their node's temporary directory

    def _watch(self) -> None:
        while not self._stopping.wait(self._poll_s):
            try:
                self.place_unplaced()
            except Exception:
                log.exception("placing runs on the Ray cluster failed; trying again")

    def place_unplaced(self) -> None:
        """Give an actor to every run an executor may take (queued, or its worker gone); one that has its
        actor already (alive, restarting or waiting for room) keeps it."""
        for run_id in self.runs.active():
            record = self.runs.get(run_id)
            if claimable(record):
                self._place(record)

    # --- the executor's side of the interface ---------------------------------------------------------------

    def submit(self, request: RunRequest) -> RunInfo:
        self._check_feasible(request.resources or self._resources)
        return super().submit(request)

    def _check_feasible(self, resources: RunResources) -> None:
        """422 for a run no node of the cluster could ever hold (it would wait forever)."""
        import ray

        total = ray.cluster_resources()
        for name, asked in (("CPU", resources.cpus), ("GPU", resources.gpus)):
            if asked > total.get(name, 0):
                raise InvalidRun(
                    f"the run asks for {asked:g} {name}s; the Ray cluster has {total.get(name, 0):g}"
                )

    def _submitted(self, record: RunRecord) -> None:
        self._place(record)

    def _cancelled(self, record: RunRecord) -> None:
        """A run cancelled before it started: its actor, still waiting for room or starting, goes now. A
        running one stops at its next micro-batch by the flag in the store."""
        if record.state == RunState.CANCELLED:
            self._kill(record.id)

    def _place(self, record: RunRecord) -> None:
        resources = record.request.resources or self._resources
        options = {
            "name": actor_name(record.id),
            "namespace": self.cluster.namespace,
            "lifetime": "detached",
            "get_if_exists": True,
            "num_cpus": resources.cpus,
            "num_gpus": resources.gpus,
            "max_restarts": self._spec.max_crashes,
        }
        if resources.memory_bytes is not None:
            options["memory"] = resources.memory_bytes
        self._actor_class.options(**options).remote(self._spec, record.id, max(int(resources.cpus), 1))

    def _kill(self, run_id: str) -> None:
        import ray

        try:
            actor = ray.get_actor(actor_name(run_id), namespace=self.cluster.namespace)
        except ValueError:  # none (never placed, or already gone)
            return
        ray.kill(actor, no_restart=True)

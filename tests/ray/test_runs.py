"""Adaptation runs on a real local Ray cluster: executed by a run's actor end to end, resumed after its worker
process is killed, and equal to the same run on the local executor."""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta

import pytest
import torch

from adapters.execution import Workspace, execute
from adapters.lease import RunContext
from adapters.queue import submit
from adapters.ray_runs import RayRunManager
from adapters.records import RunStore, owner_token
from adapters.registry import AdapterRegistry
from adapters.spec import RunInfo, RunRequest, RunResources, RunState
from backbone import Backbone
from indexing.ray_encoding import RayEncoding
from storage import ArtifactKind, DomainRegistry, artifacts
from tests.adapters.conftest import events_of, make_domain

TIMEOUT = 300
FAST = {"batch_size": 1, "top_k": 2, "eval_max_new_tokens": 4, "retriever_steps": 0}


def request(**hyperparameters) -> RunRequest:
    return RunRequest.model_validate(
        {"domain": "toy", "promote": "always", "hyperparameters": {**FAST, **hyperparameters}}
    )


def wait(manager, run_id: str, until, what: str) -> RunInfo:
    deadline = time.monotonic() + TIMEOUT
    while True:
        info = manager.get(run_id)
        if until(info):
            return info
        assert not info.state.finished, f"run ended {info.state} ({info.error}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {info}"
        time.sleep(0.2)


@pytest.fixture
def domain(tmp_path, tiny_config, tiny_backbone):
    return make_domain(tmp_path / "domain", tiny_config, tiny_backbone)


@pytest.fixture
def manager(ray_cluster, tiny_config, domain):
    manager = RayRunManager(
        domain.store,
        tiny_config,
        ray_cluster,
        resources=RunResources(cpus=1),
        ray_encoding=RayEncoding(ray_cluster, batch_size=8, concurrency=1),
        lease_s=30,
        poll_s=0.5,
    )
    manager.start()
    yield manager
    manager.stop()


def adapter_weights(store, domain: str, version: str, tmp_path) -> dict[str, torch.Tensor]:
    directory = tmp_path / f"adapter-{version}"
    artifacts.download(store, DomainRegistry(store).prefix(domain, ArtifactKind.ADAPTERS), version, directory)
    weights = Backbone.read_adapter_set(directory)
    return {f"{c}.{name}": t for c, state in weights.states.items() for name, t in state.items()}


def test_a_run_executes_on_ray_refreshes_on_ray_data_and_trains_what_the_local_executor_does(
    manager, domain, tiny_config, tmp_path
):
    run = request(steps=24, index_refresh_every=8, max_index_staleness=1, checkpoint_every=8, seed=5)
    info = manager.submit(run)
    assert info.state == RunState.QUEUED and info.resources == RunResources(cpus=1)
    done = wait(manager, info.id, lambda i: i.state.finished, "the run to finish")
    assert done.state == RunState.SUCCEEDED, done.error
    assert done.step == 24 and done.promoted

    events = events_of(manager, info.id)
    states = [e["state"] for e in events if e["kind"] == "state"]
    assert states[:3] == ["validating", "queued", "running"] and states[-1] == "succeeded"
    switched = [e for e in events if e["kind"] == "rebuild" and e["state"] == "switched"]
    assert switched and all(e["encoded_on"] == "ray" for e in switched)
    assert [c["step"] for c in manager.checkpoints(info.id)] == [16, 8]
    live = DomainRegistry(domain.store).live("toy")
    assert (live.adapter_version, live.index_version) == (done.adapter_version, done.index_version)
    index = DomainRegistry(domain.store).read_manifest("toy", ArtifactKind.INDEXES, done.index_version)
    assert index.metadata["build"]["encoded_on"] == "ray"

    # The same run on the local executor, in this process with the actor's one thread, on a twin domain.
    twin = make_domain(tmp_path / "twin", tiny_config, Backbone.load(tiny_config))
    runs = RunStore(twin.store)
    owner = owner_token("local-test")
    record = submit(runs, run, owner=owner)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = execute(RunContext(runs, record, owner), Workspace(tiny_config, tmp_path / "work"))
    finally:
        torch.set_num_threads(threads)
    assert local.state == RunState.SUCCEEDED, local.error
    on_ray = adapter_weights(domain.store, "toy", done.adapter_version, tmp_path)
    here = adapter_weights(twin.store, "toy", local.adapter_version, tmp_path)
    assert on_ray.keys() == here.keys()
    for name in on_ray:
        torch.testing.assert_close(on_ray[name], here[name], msg=f"{name} differs")


def test_a_killed_run_actor_is_restarted_by_ray_and_resumes_from_its_checkpoint(manager, domain):
    runs = RunStore(domain.store)
    run = request(steps=60, checkpoint_every=10).model_copy(update={"mode": "generator_only"})
    info = manager.submit(run)
    wait(manager, info.id, lambda i: (runs.get(i.id).checkpoint_step or 0) >= 10, "a checkpoint")
    victim = int(runs.get(info.id).owner.split("/")[1])
    os.kill(victim, signal.SIGKILL)

    done = wait(manager, info.id, lambda i: i.state.finished, "the resumed run to finish")
    assert done.state == RunState.SUCCEEDED, done.error
    assert done.step == 60 and runs.get(info.id).crashes == 1
    events = events_of(manager, info.id)
    resumed = next(e for e in events if e["kind"] == "state" and e.get("resumed_from") is not None)
    assert resumed["resumed_from"] >= 10
    after = [e["step"] for e in events if e["kind"] == "step" and e["seq"] > resumed["seq"]]
    assert after == list(range(resumed["resumed_from"] + 1, 61))
    # Nothing half-published: every adapter version under the domain has its manifest, and the run's
    # checkpoints and final version are all among them.
    prefix = DomainRegistry(domain.store).prefix("toy", ArtifactKind.ADAPTERS)
    assert artifacts.delete_incomplete(domain.store, prefix, older_than=timedelta(0), dry_run=True) == []
    complete = {m.version for m in AdapterRegistry(domain.store).list("toy")}
    assert {c["adapter_version"] for c in manager.checkpoints(info.id)} | {done.adapter_version} <= complete

"""Runs executed by RunManager's worker processes: end to end, cancelled, killed and resumed, stopped and
resumed."""

from __future__ import annotations

import os
import signal
import time
from datetime import UTC, datetime

import pytest

from adapters.records import RunStore
from adapters.registry import AdapterRegistry
from adapters.spec import RunInfo, RunRequest, RunState
from adapters.supervisor import RunManager
from storage import ArtifactKind, DomainRegistry
from tests.adapters.conftest import events_of, make_domain, run_workers

TIMEOUT = 300
# Small and quick on the tiny models: one example a step, two passages, four-token answers.
FAST = {"batch_size": 1, "top_k": 2, "eval_max_new_tokens": 4, "retriever_steps": 0}


def request(**hyperparameters) -> RunRequest:
    return RunRequest.model_validate(
        {"domain": "toy", "promote": "never", "hyperparameters": {**FAST, **hyperparameters}}
    )


def wait(manager: RunManager, run_id: str, until, what: str) -> RunInfo:
    deadline = time.monotonic() + TIMEOUT
    while True:
        info = manager.get(run_id)
        if until(info):
            return info
        assert not (info.state.finished and not until(info)), (
            f"run ended {info.state} ({info.error}) before {what}"
        )
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {info}"
        time.sleep(0.2)


def finished(info: RunInfo) -> bool:
    return info.state.finished


def wait_for_switch(manager: RunManager, run_id: str) -> int:
    """The step at which the run first switched to a refreshed index."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        for event in events_of(manager, run_id):
            if event["kind"] == "rebuild" and event["state"] == "switched":
                return event["step"]
        time.sleep(0.2)
    raise AssertionError("the run never switched to a refreshed index")


@pytest.fixture(scope="module")
def shared_domain(tmp_path_factory, tiny_config, tiny_backbone):
    return make_domain(tmp_path_factory.mktemp("domain"), tiny_config, tiny_backbone)


@pytest.fixture(scope="module")
def manager(shared_domain, tiny_config, tmp_path_factory):
    manager = RunManager(shared_domain.store, tiny_config, tmp_path_factory.mktemp("work"), lease_s=30)
    manager.start()
    yield manager
    manager.stop()


def test_a_run_refreshes_its_index_mid_run_survives_a_restart_and_succeeds(
    manager, shared_domain, tiny_backbone
):
    runs = RunStore(shared_domain.store)
    steps = 200
    info = manager.submit(
        request(
            steps=steps,
            index_refresh_every=50,
            max_index_staleness=40,  # else a slow host can finish all steps before a rebuild lands
            checkpoint_every=1000,
            reconstruction_ratio=0.3,
        ).model_copy(update={"promote": "always"})
    )
    assert info.state == RunState.QUEUED and info.total_steps == steps

    # A service restart mid-run: the worker checkpoints where it is and the run goes back to the queue.
    switched_at = wait_for_switch(manager, info.id)
    manager.stop()
    stopped = runs.get(info.id)
    assert stopped.state == RunState.QUEUED and switched_at <= stopped.checkpoint_step < steps
    assert stopped.crashes == 0  # a graceful stop is not a crash
    manager.start()
    done = wait(manager, info.id, finished, "the run to finish")
    assert done.state == RunState.SUCCEEDED, done.error
    assert done.step == steps and done.promoted

    events = events_of(manager, info.id)
    states = [e["state"] for e in events if e["kind"] == "state"]
    assert states[:3] == ["validating", "queued", "running"] and states[-1] == "succeeded"
    resumed = next(e for e in events if e.get("resumed_from") is not None)
    # Resumed where it stopped, on the refreshed index it was training against (kept beside the run).
    assert resumed["resumed_from"] == stopped.checkpoint_step and resumed["index"] == "run"
    assert [e["step"] for e in events if e["kind"] == "step"] == list(
        range(1, steps + 1)
    )  # none lost or repeated
    switched = [e for e in events if e["kind"] == "rebuild" and e["state"] == "switched"]
    assert switched and all(
        e["started_step"] < e["step"] <= e["started_step"] + 40 and e["started_step"] % 50 == 0
        for e in switched
    )
    assert {e["phase"] for e in events if e["kind"] == "eval"} == {"base", "final"}
    assert [e["step"] for e in events if e["kind"] == "checkpoint"] == [stopped.checkpoint_step, steps]

    # The outputs: an adapter version with its provenance, an index encoded by its passage encoder, both live.
    manifest = AdapterRegistry(shared_domain.store).get("toy", done.adapter_version)
    assert manifest.metadata["run_id"] == info.id
    assert manifest.metadata["backbone_fingerprint"] == tiny_backbone.fingerprint
    assert manifest.metadata["index_version"] == done.index_version
    final = manifest.metadata["metrics"]["final"]
    assert final["recall"]["dense"]["5"] is not None and final["recall_ci"]["dense"]["5"] is not None
    assert "per_question" not in final  # outcomes stay with the run; the version keeps figures and intervals
    assert set(manifest.metadata["metrics"]["improvement"]) >= {"f1", "exact_match", "dense_recall@5"}
    assert done.metrics["base"]["questions"] == 2 and done.metrics["final"]["questions"] == 2
    domains = DomainRegistry(shared_domain.store)
    index = domains.read_manifest("toy", ArtifactKind.INDEXES, done.index_version)
    assert index.metadata["build"]["passage_adapter"] != "base"
    live = domains.live("toy")
    assert (live.adapter_version, live.index_version) == (done.adapter_version, done.index_version)
    assert runs.latest_checkpoint(info.id) is None and runs.active() == []  # cleaned up with the run


def test_cancel_stops_a_running_run_within_a_step_and_leaves_the_live_version(manager, shared_domain):
    domains = DomainRegistry(shared_domain.store)
    live_before = domains.live("toy")
    running = manager.submit(
        request(steps=100_000, checkpoint_every=100_000).model_copy(update={"promote": "always"})
    )
    queued = manager.submit(request(steps=5))
    wait(manager, running.id, lambda i: i.step >= 3, "a few steps")

    assert manager.cancel(queued.id).state == RunState.CANCELLED  # never started: ends at once
    asked = manager.cancel(running.id)
    flag_set_by = datetime.now(UTC)  # the request is logged before its flag is set, so time it here
    assert asked.cancel_requested and asked.state == RunState.RUNNING
    done = wait(manager, running.id, finished, "the cancel to take effect")
    assert done.state == RunState.CANCELLED and done.step < 100_000

    events = events_of(manager, running.id)
    assert [e for e in events if e.get("cancel_requested")], "the request is in the run's events"
    later_steps = [
        e for e in events if e["kind"] == "step" and datetime.fromisoformat(e["time"]) > flag_set_by
    ]
    assert len(later_steps) <= 1, f"{len(later_steps)} steps ran after the cancel"
    live = domains.live("toy")
    assert (live.adapter_version, live.index_version) == (
        live_before.adapter_version,
        live_before.index_version,
    )
    assert not [
        m for m in AdapterRegistry(shared_domain.store).list("toy") if m.metadata["run_id"] == running.id
    ]
    assert manager.get(queued.id).started_at is None


def test_a_killed_worker_is_replaced_and_its_run_resumes_from_the_checkpoint(manager, shared_domain):
    runs = RunStore(shared_domain.store)
    info = manager.submit(
        request(steps=60, checkpoint_every=10).model_copy(update={"mode": "generator_only"})
    )
    wait(manager, info.id, lambda i: (runs.get(i.id).checkpoint_step or 0) >= 10, "a checkpoint")
    victim = int(runs.get(info.id).owner.split("/")[1])
    os.kill(victim, signal.SIGKILL)

    done = wait(manager, info.id, finished, "the resumed run to finish")
    assert done.state == RunState.SUCCEEDED, done.error
    assert done.step == 60 and done.adapter_version is not None
    assert victim not in run_workers()

    events = events_of(manager, info.id)
    requeued = next(
        e for e in events if e["kind"] == "state" and e["state"] == "queued" and "died" in e.get("reason", "")
    )
    resumed = next(e for e in events if e["kind"] == "state" and e.get("resumed_from") is not None)
    assert resumed["resumed_from"] == requeued["resumes_from"] >= 10
    after = [e["step"] for e in events if e["kind"] == "step" and e["seq"] > resumed["seq"]]
    assert after == list(range(resumed["resumed_from"] + 1, 61))
    assert runs.get(info.id).crashes == 1


def test_checkpoints_are_adapter_versions_and_runs_carry_metadata_and_an_estimated_finish(
    manager, shared_domain
):
    labels = {"team": "search", "ticket": "RAG-42"}
    run = request(steps=40, checkpoint_every=10)
    info = manager.submit(run.model_copy(update={"mode": "generator_only", "metadata": labels}))
    assert info.metadata == labels and info.estimated_finish is None
    midway = wait(manager, info.id, lambda i: 5 <= i.step < 40 and i.estimated_finish is not None, "a pace")
    assert midway.estimated_finish > midway.created_at
    done = wait(manager, info.id, finished, "the run to finish")
    assert done.state == RunState.SUCCEEDED, done.error
    assert done.metadata == labels and manager.list("toy")[0].metadata == labels

    checkpoints = manager.checkpoints(info.id)
    assert [c["step"] for c in checkpoints] == [30, 20, 10]  # the 40th is the run's own adapter version
    adapters = AdapterRegistry(shared_domain.store)
    start_index = DomainRegistry(shared_domain.store).live("toy").index_version
    for checkpoint in checkpoints:
        manifest = adapters.get("toy", checkpoint["adapter_version"])
        assert manifest.metadata["run_id"] == info.id
        assert manifest.metadata["checkpoint_step"] == checkpoint["step"]
        assert manifest.metadata["index_version"] == start_index and checkpoint["metrics"]["loss"] > 0
    assert done.adapter_version not in {c["adapter_version"] for c in checkpoints}
    events = events_of(manager, info.id)
    assert [e["adapter_version"] for e in events if e["kind"] == "checkpoint"][:3] == [
        c["adapter_version"] for c in reversed(checkpoints)
    ]

    # Events come in pages that chain through `next`, none lost or repeated.
    pages, after, more = [], 0, True
    while more:
        page, after, more = manager.events(info.id, after, limit=7)
        assert len(page) <= 7 and (not more or len(page) == 7)
        pages.append(page)
    assert (
        [e["seq"] for page in pages for e in page]
        == [e["seq"] for e in events]
        == list(range(1, len(events) + 1))
    )

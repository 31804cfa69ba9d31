"""Adaptation runs survive the S3 server going away: the worker and its supervisor wait for the store, and
the run resumes from its checkpoint once the store is back. The server here is a SeaweedFS process of this
module's own, killed (SIGKILL) and started again."""

from __future__ import annotations

import time

import pytest

from adapters.records import RunStore
from adapters.spec import RunRequest, RunState
from adapters.supervisor import RunManager
from storage import S3Store
from tests.adapters.conftest import events_of, make_domain, run_workers
from tests.s3server import SeaweedS3

TIMEOUT = 300
OUTAGE_S = 12  # longer than a worker takes to notice, fail its claim and die without the fix


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with SeaweedS3(tmp_path_factory.mktemp("outage-s3")) as server:
        yield server


def _request(steps: int) -> RunRequest:
    return RunRequest.model_validate(
        {
            "domain": "toy",
            "mode": "generator_only",
            "promote": "never",
            "evaluation": None,
            "hyperparameters": {"steps": steps, "batch_size": 1, "top_k": 2, "checkpoint_every": 10},
        }
    )


def _wait(what: str, until, timeout: float = TIMEOUT):
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = until()
        except Exception:  # the store may still be coming back
            found = None
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_a_store_outage_mid_run_pauses_the_run_which_then_resumes_from_its_checkpoint(
    server, tmp_path, tiny_config, tiny_backbone
):
    config = server.store_config()
    store = S3Store(config)
    make_domain(tmp_path, tiny_config, tiny_backbone, store=store)
    runs = RunStore(store)
    manager = RunManager(store, tiny_config, tmp_path / "work", store_config=config, lease_s=30)
    manager.start()
    try:
        running = manager.submit(_request(400))
        waiting = manager.submit(_request(5))  # queued behind it: must not stay queued forever
        _wait("a checkpoint", lambda: (runs.get(running.id).checkpoint_step or 0) >= 10)
        workers = run_workers()
        assert runs.get(running.id).step < 400

        server.kill()
        time.sleep(OUTAGE_S)
        assert manager.alive_workers == 1 and run_workers() == workers, "a run worker died"
        assert manager.supervisor == "running", "the supervisor of the run workers died in the outage"
        server.start()

        done = _wait("the run to finish", lambda: (r := manager.get(running.id)).state.finished and r)
        assert done.state == RunState.SUCCEEDED, done.error
        assert done.step == 400 and done.adapter_version is not None
        second = _wait(
            "the queued run to finish", lambda: (r := manager.get(waiting.id)).state.finished and r
        )
        assert second.state == RunState.SUCCEEDED, second.error

        record = runs.get(running.id)
        assert record.crashes == 0  # waiting out an outage is not a crash
        events = events_of(manager, running.id)
        paused = next(
            e
            for e in events
            if e["kind"] == "state" and e["state"] == "queued" and "store" in e.get("reason", "")
        )
        resumed = next(e for e in events if e["seq"] > paused["seq"] and e.get("resumed_from") is not None)
        assert resumed["resumed_from"] == paused["resumes_from"] >= 10
        steps = [e["step"] for e in events if e["kind"] == "step" and e["seq"] > resumed["seq"]]
        assert steps == list(range(resumed["resumed_from"] + 1, 401))
        assert run_workers() == workers and manager.alive_workers == 1
        assert manager.supervisor == "running"
    finally:
        server.start()
        manager.stop()

"""`/readyz` says what a load balancer and an operator need: the backbone, the store, the run workers."""

from __future__ import annotations

import os
import signal
import time

from adapters.supervisor import worker_scratch
from tests.adapters.conftest import run_workers
from tests.service.support import serve


def _until(what: str, check, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return found


def test_readyz_reports_the_run_workers_and_a_dead_supervisor(local_store_settings, make_settings):
    settings = make_settings(local_store_settings, runs={"max_concurrent": 1})
    with serve(settings) as served, served.client() as client:
        runs = served.runtime.runs
        ready = _until("the run worker", lambda: (r := client.get("/readyz").json())["runs"]["workers"] and r)
        assert ready["runs"] == {"supervisor": "running", "workers": 1, "expected": 1}

        # A killed worker is replaced, and the scratch directory it leaves (a run's files) is swept.
        [(victim, token)] = run_workers().items()
        scratch = worker_scratch(settings.cache_dir / "runs", token)
        (scratch / "runs" / "some-run").mkdir(parents=True, exist_ok=True)
        os.kill(victim, signal.SIGKILL)
        _until(
            "a new worker",
            lambda: run_workers() and victim not in run_workers() and runs.alive_workers == 1,
        )
        assert not scratch.exists()
        assert client.get("/readyz").json()["runs"]["workers"] == 1

        # Nothing in the supervisor's loop ends it; a bug that did would leave runs queued forever. Its thread
        # is told to end here, as such a bug would end it.
        runs._stopping.set()
        runs._monitor.join(10)
        down = client.get("/readyz")
        assert down.status_code == 503 and down.json()["code"] == "run_workers_down"
        assert int(down.headers["retry-after"]) > 0

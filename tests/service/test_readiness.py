"""`/readyz` says what a load balancer and an operator need: the backbone, the store, the run workers."""

from __future__ import annotations

import os
import signal

from adapters.supervisor import worker_scratch
from storage import ArtifactKind
from tests.adapters.conftest import run_workers
from tests.service.support import ADMIN, finished_job, serve, until


def test_readyz_reports_the_run_workers_and_a_dead_supervisor(local_store_settings, make_settings):
    settings = make_settings(local_store_settings, runs={"max_concurrent": 1})
    with serve(settings) as served, served.client() as client:
        runs = served.runtime.runs
        ready = until(
            "the run worker", lambda: (r := client.get("/readyz").json())["runs"]["workers"] and r, 120.0
        )
        assert ready["runs"] == {"supervisor": "running", "workers": 1, "expected": 1}

        # A killed worker is replaced, and the scratch directory it leaves (a run's files) is swept.
        [(victim, token)] = run_workers().items()
        scratch = worker_scratch(settings.cache_dir / "runs", token)
        (scratch / "runs" / "some-run").mkdir(parents=True, exist_ok=True)
        os.kill(victim, signal.SIGKILL)
        until(
            "a new worker",
            lambda: run_workers() and victim not in run_workers() and runs.alive_workers == 1,
            120.0,
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


def test_a_large_factory_faiss_cannot_build_keeps_the_server_not_ready_saying_why(
    local_store_settings, make_settings
):
    settings = make_settings(local_store_settings, indexing={"large_factory": "IVF8,PQ7"})  # 7 divides no dim
    with serve(settings, ready=False) as served, served.client() as client:
        until("the load to fail", lambda: served.runtime.load_error is not None, 120.0)
        down = client.get("/readyz")
        assert down.status_code == 503 and "indexing.large_factory 'IVF8,PQ7'" in down.json()["detail"]


def test_a_new_domain_past_flat_max_gets_the_large_factory(local_store_settings, make_settings):
    settings = make_settings(local_store_settings, indexing={"flat_max": 2, "large_factory": "HNSW16"})
    passages = [
        {"id": f"p{i}", "title": f"topic {i}", "text": f"passage number {i} about things"} for i in range(6)
    ]
    with serve(settings) as served, served.client() as client:
        created = client.post("/admin/domains", headers=ADMIN, json={"name": "big", "passages": passages})
        assert created.status_code == 202, created.text
        job = created.json()["job"]["id"]
        done = finished_job(client, job, "the build", 120.0)
        assert done["state"] == "succeeded", done
        live = served.runtime.registry.live("big")
        manifest = served.runtime.registry.read_manifest("big", ArtifactKind.INDEXES, live.index_version)
        assert manifest.metadata["build"]["factory"] == "HNSW16"

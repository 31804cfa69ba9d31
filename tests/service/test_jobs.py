"""A domain's index build is a persisted job: it survives the server being killed and the store going away,
a build that failed says why, and such a domain can be rebuilt or deleted. Faults are real: the server and
the S3 server are processes killed with SIGKILL, and a build's worker process is killed the same way."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from storage import DomainRegistry, new_version_id, open_store
from tests.s3server import SeaweedS3
from tests.service.support import ADMIN, TOPICS, ServerProcess, finished_job, serve, until

PASSAGES = [
    {"id": f"{title.lower()}-{i}", "title": title, "text": f"{text} note {i}"}
    for i in range(2)
    for title, text in TOPICS
]
ASK = {"question": "what is the capital of france", "top_k": 2, "max_new_tokens": 3}


def _create(client: httpx.Client, name: str) -> dict:
    created = client.post("/admin/domains", headers=ADMIN, json={"name": name, "passages": PASSAGES})
    assert created.status_code == 202, created.text
    return created.json()["job"]


def _job(client: httpx.Client, job_id: str) -> dict:
    response = client.get(f"/admin/jobs/{job_id}", headers=ADMIN)
    assert response.status_code == 200, response.text
    return response.json()


def _answered(client: httpx.Client, domain: str):
    response = client.post("/ask", params={"domain": domain}, json=ASK)
    return response.status_code == 200 and response


def _rebuild_workers() -> list[int]:
    """Index-build worker processes started by this process (multiprocessing spawn children)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        if ppid == os.getpid() and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def test_a_failed_build_says_why_and_the_domain_can_be_rebuilt_then_deleted(
    local_store_settings, make_settings
):
    settings = make_settings(local_store_settings)
    with serve(settings) as served, served.client() as client:
        before = set(_rebuild_workers())
        job = _create(client, "toy")
        victim = until("the build's worker process", lambda: sorted(set(_rebuild_workers()) - before), 60)[0]
        os.kill(victim, signal.SIGKILL)
        failed = until("the job to fail", lambda: (j := _job(client, job["id"]))["state"] == "failed" and j)
        assert "worker_died" in failed["error"]

        refused = client.post("/ask", params={"domain": "toy"}, json=ASK)
        assert refused.status_code == 409, refused.text
        body = refused.json()
        assert body["code"] == "domain_build_failed" and job["id"] in body["detail"]
        assert "worker_died" in body["detail"] and "rebuild" in body["detail"]
        assert (
            client.post("/admin/domains", headers=ADMIN, json={"name": "toy", "passages": PASSAGES}).json()[
                "code"
            ]
            == "domain_exists"
        )

        rebuilt = client.post("/admin/domains/toy/rebuild", headers=ADMIN)
        assert rebuilt.status_code == 202, rebuilt.text
        again = client.post("/admin/domains/toy/rebuild", headers=ADMIN, json={})
        assert again.status_code == 409 and again.json()["code"] == "build_in_progress"
        assert again.json()["detail"].count(rebuilt.json()["id"]) == 1
        done = finished_job(client, rebuilt.json()["id"], "the rebuild")
        assert done["state"] == "succeeded" and done["result"]["passages"] == len(PASSAGES), done
        assert until("an answer", lambda: _answered(client, "toy"), 30)
        assert client.get("/readyz").json()["building"] == []

        deleted = client.delete("/admin/domains/toy", headers=ADMIN)
        assert deleted.status_code == 204, deleted.text
        assert client.get("/domains/toy").status_code == 404
        assert client.post("/ask", params={"domain": "toy"}, json=ASK).json()["code"] == "domain_not_found"
        assert client.delete("/admin/domains/toy", headers=ADMIN).json()["code"] == "domain_not_found"
        store = open_store(settings.store_config)
        assert [info.key for info in store.list("domains/toy/")] == []
        # The name is free again, with nothing of the old domain under it.
        job = _create(client, "toy")
        assert until("the new domain's build", lambda: _job(client, job["id"])["state"] == "succeeded")
        assert len(client.get("/domains/toy").json()["versions"]["indexes"]) == 1


def test_a_domain_is_not_deleted_under_a_run(local_store_settings, make_settings):
    settings = make_settings(local_store_settings)  # no run workers: a run stays queued
    with serve(settings) as served, served.client() as client:
        job = _create(client, "toy")
        until("the build", lambda: _job(client, job["id"])["state"] == "succeeded")
        run = client.post(
            "/admin/adapt",
            headers=ADMIN,
            json={
                "domain": "toy",
                "promote": "never",
                "evaluation": None,
                "train": {"examples": [{"question": "what is the capital of france", "answers": ["paris"]}]},
                "hyperparameters": {"steps": 1, "batch_size": 1, "top_k": 2},
            },
        )
        assert run.status_code == 202, run.text
        refused = client.delete("/admin/domains/toy", headers=ADMIN)
        assert refused.status_code == 409 and refused.json()["code"] == "domain_in_use"
        assert run.json()["id"] in refused.json()["detail"]
        assert _answered(client, "toy")  # nothing was deleted
        client.post(f"/admin/runs/{run.json()['id']}/cancel", headers=ADMIN)
        assert client.delete("/admin/domains/toy", headers=ADMIN).status_code == 204


def test_an_interrupted_deletion_is_finished_by_deleting_again(local_store_settings, make_settings):
    settings = make_settings(local_store_settings)
    with serve(settings) as served, served.client() as client:
        job = _create(client, "toy")
        until("the build", lambda: _job(client, job["id"])["state"] == "succeeded")
        # What a server killed in the middle of a deletion leaves: the record marked, the rest still there.
        registry = DomainRegistry(open_store(settings.store_config))
        registry.update_domain("toy", lambda d: d.model_copy(update={"deleting": True}))
        assert client.get("/domains/toy").status_code == 404
        assert until(
            "the catalog to drop it",
            lambda: client.post("/ask", params={"domain": "toy"}, json=ASK).status_code == 404,
            30,
        )
        exists = client.post("/admin/domains", headers=ADMIN, json={"name": "toy", "passages": PASSAGES})
        assert exists.status_code == 409 and "delete it again" in exists.json()["detail"]
        assert client.delete("/admin/domains/toy", headers=ADMIN).status_code == 204
        assert list(registry.store.list("domains/toy/")) == []


def test_a_store_outage_during_ingest_is_waited_out(tmp_path, make_settings):
    with SeaweedS3(tmp_path / "s3") as s3:
        config = s3.store_config()
        settings = make_settings(
            {
                "backend": "s3",
                "endpoint": config.endpoint,
                "bucket": config.bucket,
                "access_key": config.access_key,
                "secret_key": config.secret_key.get_secret_value(),
            }
        )
        with serve(settings) as served, served.client() as client:
            job = _create(client, "toy")
            s3.kill()
            time.sleep(6)
            s3.start()
            done = finished_job(client, job["id"], "the job")
            assert done["state"] == "succeeded", done
            assert until("an answer", lambda: _answered(client, "toy"), 30)
            store = open_store(settings.store_config)
            assert until(
                "the record",
                lambda: json.loads(store.get_bytes(f"jobs/{job['id']}/job.json"))["state"] == "succeeded",
                30,
            )
            assert list(store.list("jobs/active/")) == []


@pytest.mark.parametrize("restart_after_s", [0.0, 3.0])
def test_a_server_killed_during_ingest_resumes_the_job_after_a_restart(
    local_store_settings, make_settings, tmp_path, restart_after_s
):
    settings = make_settings(local_store_settings)
    server = ServerProcess(settings, tmp_path / "server.log")
    server.start()
    try:
        with server.client() as client:
            job = _create(client, "toy")
            time.sleep(restart_after_s)
            server.kill()
            server.start()
            done = finished_job(client, job["id"], "the resumed job")
            assert done["state"] == "succeeded", done
            assert done["result"]["passages"] == len(PASSAGES)
            assert until("an answer", lambda: _answered(client, "toy"), 30)
            live = client.get("/domains/toy").json()["live"]
            assert live["index_version"] == done["result"]["index_version"]
    finally:
        server.stop()


def test_a_domain_whose_job_was_lost_before_it_was_recorded_says_so_and_is_rebuilt(
    local_store_settings, make_settings, tmp_path
):
    """What a server killed between creating a domain and recording its job leaves: the domain names a job
    that does not exist, and the passages it was given are in the store."""
    settings = make_settings(local_store_settings)
    store = open_store(settings.store_config)
    job_id = new_version_id()
    passages = tmp_path / "passages.jsonl"
    passages.write_text("".join(json.dumps(p) + "\n" for p in PASSAGES))
    store.put_file(f"jobs/{job_id}/passages.jsonl", passages)
    DomainRegistry(store).create_domain("toy", settings={"retrieval": "dense"}, build_job=job_id)
    with serve(settings) as served, served.client() as client:
        lost = client.post("/ask", params={"domain": "toy"}, json=ASK)
        assert lost.status_code == 409 and lost.json()["code"] == "domain_build_failed"
        assert "lost" in lost.json()["detail"]
        rebuilt = client.post("/admin/domains/toy/rebuild", headers=ADMIN)
        assert rebuilt.status_code == 202 and rebuilt.json()["kind"] == "ingest", rebuilt.text
        done = finished_job(client, rebuilt.json()["id"], "the rebuild")
        assert done["state"] == "succeeded", done
        assert until("an answer", lambda: _answered(client, "toy"), 30)

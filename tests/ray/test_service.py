"""The service with `runs.executor: ray` and `indexing.executor: ray`, pointed at a cluster started by
`ray start --head` on loopback (started and stopped by this test only, with token authentication as Ray
enables it): a domain ingested on Ray Data, a run trained in its actor and cancelled through the API while
the live version keeps answering."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from service.settings import Settings, StoreSettings
from storage import ArtifactKind, DomainRegistry, LocalStore
from tests.service.support import ADMIN, TOPICS, ServerProcess, finished_job, free_port, until

pytestmark = pytest.mark.integration

PASSAGES = [
    {"id": f"{title.lower()}-{i}", "title": title, "text": f"{text} note {i}"}
    for i in range(2)
    for title, text in TOPICS
]
ASK = {"question": "what is the capital of france", "top_k": 2, "max_new_tokens": 3}


@contextmanager
def ray_head(log: Path, auth: dict[str, str]) -> Iterator[str]:
    """`ray start --head --block` on loopback in a session of its own; yields its address. Stopped by
    signalling that session's process group only (not `ray stop`, which would end every cluster here)."""
    port = free_port()
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # Ray's socket paths must stay short
    command = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        "--block",
        f"--port={port}",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=2",
        "--object-store-memory=100000000",
        f"--temp-dir={temp}",
        "--include-dashboard=false",
        "--disable-usage-stats",
    ]
    with log.open("w") as out:
        head = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **auth}
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert head.poll() is None, f"ray start exited:\n{log.read_text()[-3000:]}"
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, f"the Ray head never listened:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(30)
        deadline = time.monotonic() + 30
        while _group_alive(head.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _group_alive(head.pid):
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_service_on_a_ray_cluster_ingests_trains_and_cancels_while_the_live_version_serves(
    tiny_backbone_settings, tmp_path
):
    settings = Settings(
        data_dir=tmp_path / "data",
        store=StoreSettings(backend="local", root=tmp_path / "store"),
        backbone=tiny_backbone_settings,
    )
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    with ray_head(tmp_path / "ray.log", auth) as address:
        server = ServerProcess(
            settings,
            tmp_path / "server.log",
            RAGADAPT_RUNS__EXECUTOR="ray",
            RAGADAPT_RUNS__RESOURCES__CPUS="1",
            RAGADAPT_INDEXING__EXECUTOR="ray",
            RAGADAPT_INDEXING__CONCURRENCY="1",
            RAGADAPT_RAY__ADDRESS=address,
            **auth,  # how an operator gives the service the cluster's token: Ray's own variables
        )
        server.start()
        try:
            with server.client() as client:
                created = client.post(
                    "/admin/domains", headers=ADMIN, json={"name": "toy", "passages": PASSAGES}
                )
                assert created.status_code == 202, created.text
                job = created.json()["job"]["id"]
                done = finished_job(client, job, "the ingest", 240.0)
                assert done["state"] == "succeeded", done
                registry = DomainRegistry(LocalStore(tmp_path / "store"))
                live = registry.live("toy")
                index = registry.read_manifest("toy", ArtifactKind.INDEXES, live.index_version)
                assert index.metadata["build"]["encoded_on"] == "ray"
                assert client.post("/ask", params={"domain": "toy"}, json=ASK).status_code == 200

                example = {"question": "what is the capital of france", "answers": ["paris"]}
                body = {
                    "domain": "toy",
                    "mode": "generator_only",
                    "promote": "always",
                    "train": {"examples": [example]},
                    "evaluation": None,
                    "hyperparameters": {"steps": 100_000, "checkpoint_every": 100_000, "batch_size": 1},
                    "resources": {"cpus": 1},
                }
                submitted = client.post("/admin/adapt", headers=ADMIN, json=body)
                assert submitted.status_code == 202, submitted.text
                run = submitted.json()["id"]
                assert submitted.json()["resources"] == {"cpus": 1.0, "gpus": 0.0, "memory_bytes": None}

                def run_info() -> dict:
                    return client.get(f"/admin/runs/{run}", headers=ADMIN).json()

                until("a few steps on the cluster", lambda: run_info()["step"] >= 2, 240.0)
                cancelled = client.post(f"/admin/runs/{run}/cancel", headers=ADMIN)
                assert cancelled.status_code == 200 and cancelled.json()["cancel_requested"], cancelled.text
                ended = until("the cancel", lambda: (i := run_info())["state"] != "running" and i, 240.0)
                assert ended["state"] == "cancelled" and ended["step"] < 100_000
                assert registry.live("toy") == live  # nothing promoted
                assert client.post("/ask", params={"domain": "toy"}, json=ASK).status_code == 200
        finally:
            server.stop()

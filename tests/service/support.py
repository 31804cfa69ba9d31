"""Helpers of the service tests: a real uvicorn server on loopback, domains and adapter versions on a real
store, and answers computed by calling the backbone directly (what the service must reproduce)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
import uvicorn

from adapters import AdapterRegistry
from backbone import AdapterSetConfig, Backbone, Passage
from indexing import EncodeConfig, IndexHandle, ingest, write_passages
from indexing.versions import IndexVersions
from service.app import create_app
from service.jobs import FINISHED
from service.runtime import Runtime
from service.settings import Settings
from storage import DomainRegistry, ObjectStore

ADMIN_TOKEN = "test-admin-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

TOPICS = [
    ("Paris", "the capital of france is paris and the river is the seine"),
    ("Rome", "the capital of italy is rome and the river is the tiber"),
    ("Covid", "covid spreads through droplets and the incubation period is five days"),
    ("Revenue", "the company revenue was 42 million dollars in 2019 and 51 million in 2020"),
    ("Friends", "ross and rachel were on a break said ross to joey in the coffee house"),
    ("Encoders", "passages questions answers retrieval generator encoder adapter domain"),
]
QUESTIONS = [
    "what is the capital of france",
    "how long is the incubation period of covid",
    "what was the company revenue in 2019",
    "who was on a break",
    "what is the river of rome",
    "which encoder retrieval adapter",
]


def corpus(rounds: int = 2) -> list[Passage]:
    return [
        Passage(f"{title.lower()}-{r}", title, f"{text} note {r}")
        for r in range(rounds)
        for title, text in TOPICS
    ]


@dataclass
class Served:
    url: str
    runtime: Runtime

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 60.0), **kwargs)


@contextmanager
def serve(settings: Settings, *, ready: bool = True, timeout: float = 120.0) -> Iterator[Served]:
    """`create_app(settings)` served by uvicorn on a free loopback port, in a thread; stopped on exit."""
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    served = Served(f"http://127.0.0.1:{port}", app.state.runtime)
    try:
        if ready:
            with served.client() as client:
                while client.get("/readyz").status_code != 200:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"not ready after {timeout}s: {client.get('/readyz').text}")
                    time.sleep(0.05)
        yield served
    finally:
        server.should_exit = True
        thread.join(60)


def ingest_domain(
    store: ObjectStore, backbone: Backbone, name: str, work_dir: Path, passages: list[Passage] | None = None
) -> str:
    """A domain with a live base index, built in this process; returns the index version."""
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / f"{name}.jsonl"
    write_passages(passages or corpus(), path)
    return ingest(
        name, path, store, backbone.config, backbone=backbone, encode=EncodeConfig(progress=False)
    ).index_version


def publish_adapter(
    store: ObjectStore, backbone: Backbone, domain: str, seed: int, work_dir: Path, scale: float = 0.3
) -> str:
    """A randomised adapter set (so it changes the outputs), published as a new version of `domain`."""
    key = f"publish-{domain}-{seed}"
    backbone.add_adapter_set(key)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for params in backbone.trainable_parameters(key).values():
            for param in params:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    directory = work_dir / key
    backbone.save_adapter_set(key, directory)
    backbone.remove_adapter_set(key)
    manifest = AdapterRegistry(store).publish(
        domain, directory, backbone_fingerprint=backbone.fingerprint, lora=AdapterSetConfig()
    )
    return manifest.version


def open_live_index(store: ObjectStore, backbone: Backbone, domain: str, cache_dir: Path) -> IndexHandle:
    versions = IndexVersions(DomainRegistry(store), cache_dir)
    return versions.open_live(domain, embedding_dim=backbone.embedding_dim, fingerprint=backbone.fingerprint)


class Direct:
    """The pipeline the service runs, called directly on a backbone of the same configuration."""

    def __init__(self, backbone: Backbone, store: ObjectStore, scratch: Path):
        self.backbone = backbone
        self.store = store
        self.scratch = scratch

    def attach(self, domain: str, version: str) -> str:
        key = f"direct-{domain}@{version}"
        if key not in self.backbone.adapter_sets:
            target = self.scratch / key
            adapters = AdapterRegistry(self.store)
            adapters.fetch(
                adapters.ref(domain, version), target, expected_fingerprint=self.backbone.fingerprint
            )
            self.backbone.load_adapter_set(key, target)
        return key

    def answer(
        self,
        handle: IndexHandle,
        question: str,
        domain: str,
        version: str | None,
        *,
        top_k: int = 3,
        max_new_tokens: int = 8,
    ) -> str:
        """With dense retrieval (what the tests ask for), as the worker runs it."""
        key = self.attach(domain, version) if version is not None else None
        with torch.inference_mode():
            query = self.backbone.encode_questions([question], [key])  # [1, dim]
        hits = handle.search(query, [question], k=top_k, mode="dense")[0]
        return self.backbone.answer(
            [question],
            [[h.passage for h in hits]],
            [[h.score for h in hits]],
            [key],
            max_new_tokens=max_new_tokens,
        )[0].text


class ServerProcess:
    """`ragadapt serve` in a process of its own (so a test can kill it), configured through RAGADAPT_*
    variables as an operator would; `settings` gives the tiny backbone, data directory and store."""

    def __init__(self, settings: Settings, log: Path, **env: str):
        self.settings = settings
        self.log = log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        backbone, store = settings.backbone, settings.store
        self.env = {
            **os.environ,
            "RAGADAPT_DATA_DIR": str(settings.data_dir),
            "RAGADAPT_SERVER__HOST": "127.0.0.1",
            "RAGADAPT_SERVER__PORT": str(self.port),
            "RAGADAPT_SERVER__ADMIN_TOKEN": ADMIN_TOKEN,
            "RAGADAPT_SERVER__POLL_INTERVAL_S": "0.5",
            "RAGADAPT_DEMO__ENABLED": "false",
            "RAGADAPT_RUNS__MAX_CONCURRENT": "0",
            "RAGADAPT_BACKBONE__QUESTION_ENCODER": backbone.question_encoder,
            "RAGADAPT_BACKBONE__PASSAGE_ENCODER": backbone.passage_encoder,
            "RAGADAPT_BACKBONE__GENERATOR": backbone.generator,
            "RAGADAPT_BACKBONE__CACHE_DIR": str(backbone.cache_dir),
            "RAGADAPT_BACKBONE__DTYPE": backbone.dtype,
            "RAGADAPT_BACKBONE__MAX_PASSAGE_TOKENS": str(backbone.max_passage_tokens),
            "RAGADAPT_BACKBONE__MAX_ANSWER_TOKENS": str(backbone.max_answer_tokens),
            "RAGADAPT_STORE__BACKEND": store.backend,
            **({"RAGADAPT_STORE__ROOT": str(store.root)} if store.root else {}),
            **env,
        }
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> None:
        with self.log.open("a") as out:
            self.process = subprocess.Popen(
                [str(Path(sys.executable).parent / "ragadapt"), "serve"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"ragadapt serve exited with {self.process.returncode}:\n{self.log.read_text()[-4000:]}"
                )
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready after {timeout}s:\n{self.log.read_text()[-4000:]}")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: what an OOM kill or a power cut looks like (child processes are left running)."""
        self.process.kill()
        self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60.0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def until(what: str, check, timeout: float = 180.0):
    """Poll `check` until it returns something truthy, and return that; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def finished_job(client: httpx.Client, job_id: str, what: str, timeout: float = 180.0) -> dict:
    """The job's body once it has finished (succeeded, failed or cancelled); fail after `timeout` seconds."""

    def finished() -> dict | None:
        response = client.get(f"/admin/jobs/{job_id}", headers=ADMIN)
        assert response.status_code == 200, response.text
        job = response.json()
        return job if job["state"] in FINISHED else None

    return until(what, finished, timeout)

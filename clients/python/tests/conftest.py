"""Fixtures for the SDK tests: the real service on loopback, a scripted HTTP server, and a way to run one test
through both clients."""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from ragadapt_client import AsyncClient, Client, RetryPolicy

from scripted import ScriptedServer, free_port

# Backoff small enough for fast tests, large enough to be measurable.
FAST_RETRY = RetryPolicy(max_retries=2, initial_backoff=0.02, max_backoff=0.1)


@pytest.fixture
def scripted():
    with ScriptedServer() as server:
        yield server


@pytest.fixture(params=["sync", "async"])
def using(request) -> Callable[..., Any]:
    """``using(url, lambda client: client.health(), **client_options)`` runs the call through ``Client`` or
    ``AsyncClient`` (awaiting what it returns), so each test checks both clients' behaviour."""

    def run_sync(url: str, action: Callable[[Any], Any], **options: Any) -> Any:
        options.setdefault("retry", FAST_RETRY)
        with Client(url, **options) as client:
            return action(client)

    def run_async(url: str, action: Callable[[Any], Any], **options: Any) -> Any:
        options.setdefault("retry", FAST_RETRY)

        async def main() -> Any:
            async with AsyncClient(url, **options) as client:
                result = action(client)
                return await result if inspect.isawaitable(result) else result

        return asyncio.run(main())

    return run_sync if request.param == "sync" else run_async


ADMIN_TOKEN = "admin-test-token"
API_KEY = "reader-test-key"
# Words the tiny test tokenizer knows, so retrieval and generation run on real token ids.
PASSAGES = [
    {
        "id": "geo-1",
        "title": "capitals",
        "text": "the capital of france is paris and the capital of italy is rome",
    },
    {
        "id": "med-1",
        "title": "covid",
        "text": "covid spreads through droplets and the incubation period is five days",
    },
    {
        "id": "fin-1",
        "title": "revenue",
        "text": "the company revenue was 42 million dollars in 2019 and 51 million in 2020",
    },
]
QA = [
    {"question": "what is the capital of france", "answers": ["paris"], "passage_ids": ["geo-1"]},
    {"question": "what is the incubation period", "answers": ["five days"], "passage_ids": ["med-1"]},
    {"question": "what was the revenue in 2019", "answers": ["42 million"], "passage_ids": ["fin-1"]},
    {
        "question": "what is the capital of italy",
        "answers": ["rome"],
        "passage_ids": ["geo-1"],
        "split": "dev",
    },
]
# A run that takes seconds on the tiny models: two generator steps over the tiny domain's three passages.
TINY_RUN = {"steps": 2, "batch_size": 2, "top_k": 2}


@dataclass(frozen=True)
class LiveServer:
    url: str
    admin_token: str
    api_key: str


@pytest.fixture(scope="session")
def live_server(tmp_path_factory) -> LiveServer:
    """The real service (``service.app.create_app``) on a loopback port, with tiny random models and a local
    store in a temporary directory; admin token and one API key configured."""
    import uvicorn

    from service.app import create_app
    from service.settings import BackboneSettings, DemoSettings, ServerSettings, Settings
    from tests.models import tiny_backbone_config

    root = tmp_path_factory.mktemp("live-server")
    tiny = tiny_backbone_config(root / "models")
    settings = Settings(
        data_dir=root / "data",
        server=ServerSettings(admin_token=ADMIN_TOKEN, api_keys=[API_KEY], poll_interval_s=0.2),
        backbone=BackboneSettings(
            question_encoder=tiny.question_encoder,
            passage_encoder=tiny.passage_encoder,
            generator=tiny.generator,
            cache_dir=tiny.cache_dir,
            dtype="float32",
            max_passage_tokens=48,
            max_answer_tokens=12,
        ),
        demo=DemoSettings(enabled=False),
    )
    port = free_port()
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="live-server", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError("the live server did not become ready within 120 s")
        time.sleep(0.05)
    yield LiveServer(url, ADMIN_TOKEN, API_KEY)
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="session")
def tiny_domain(live_server) -> str:
    """A domain over ``PASSAGES`` with ``QA`` (train and dev splits), created once through the SDK and ready
    to answer. Served by the base backbone: tests that promote an adapter roll back before they end."""
    with Client(live_server.url, admin_token=live_server.admin_token) as client:
        job = client.domains.create("tiny", PASSAGES, qa=QA, description="three facts")
        job.wait(progress=False, timeout=300, poll_interval=0.1, max_poll_interval=0.5)
    return "tiny"

"""The real service with tiny random models on a loopback port, for checks of what deploy/ relies on."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

ADMIN_TOKEN = "deploy-test-token"


@pytest.fixture(scope="module")
def tiny_service(tiny_root, tmp_path_factory) -> Iterator[str]:
    """The app of ``service.app.create_app`` served by uvicorn; yields its base URL once it is ready."""
    import uvicorn

    from service.app import create_app
    from service.settings import BackboneSettings, DemoSettings, ServerSettings, Settings
    from tests.models import tiny_backbone_config

    tiny = tiny_backbone_config(tiny_root)
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("deploy-service"),
        server=ServerSettings(admin_token=ADMIN_TOKEN, poll_interval_s=0.2),
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
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, name="deploy-service", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the service did not become ready within 120 s")
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)

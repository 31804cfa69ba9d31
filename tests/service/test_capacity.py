"""A full queue answers 503 with Retry-After at once (no hang); a request over its time budget answers 504."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from storage import open_store
from tests.service.support import QUESTIONS, ingest_domain, serve

SLOW = {"top_k": 20, "max_new_tokens": 200}  # long generations keep the worker busy


def _ask(client, i: int):
    return client.post("/ask?domain=alpha", json={"question": QUESTIONS[i % len(QUESTIONS)], **SLOW})


def test_a_full_queue_is_refused_with_retry_after(
    local_store_settings, make_settings, direct_backbone, tmp_path
):
    settings = make_settings(
        local_store_settings, server={"queue_size": 1, "max_batch_rows": 1, "retry_after_s": 2}
    )
    ingest_domain(open_store(settings.store_config), direct_backbone, "alpha", tmp_path / "corpus")
    with serve(settings) as served, served.client(timeout=60) as client:
        started = time.monotonic()
        with ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(lambda i: _ask(client, i), range(12)))
        elapsed = time.monotonic() - started
        codes = sorted(r.status_code for r in responses)
        refused = [r for r in responses if r.status_code == 503]
        assert set(codes) == {200, 503}, codes
        for response in refused:
            assert response.json()["code"] == "overloaded"
            assert response.headers["retry-after"] == "2"
        # One running and one queued at most: everyone else was refused at once, not after waiting.
        assert len(refused) >= 12 - 2 - 2
        assert elapsed < 60


def test_a_request_over_its_time_budget_is_504(
    local_store_settings, make_settings, direct_backbone, tmp_path
):
    settings = make_settings(local_store_settings, server={"request_timeout_s": 0.05, "max_batch_rows": 1})
    ingest_domain(open_store(settings.store_config), direct_backbone, "alpha", tmp_path / "corpus")
    with serve(settings) as served, served.client() as client:
        with ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(lambda i: _ask(client, i), range(4)))
        assert any(r.status_code == 504 for r in responses), [r.status_code for r in responses]
        for response in responses:
            if response.status_code == 504:
                assert response.json()["code"] == "request_timeout"
        # The server is still healthy after abandoned requests.
        assert client.get("/readyz").status_code == 200

"""A fresh server on the embedded default backbone builds the demo domain from the README and answers."""

from __future__ import annotations

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.settings import BackboneSettings, Settings
from storage import DomainRegistry, open_store
from tests.conftest import EMBEDDED_CACHE
from tests.service.support import serve


def _ask_until_built(client, question: dict):
    deadline = time.monotonic() + 300
    while True:
        response = client.post("/ask?domain=demo", json=question)
        if response.status_code != 503:
            return response
        assert response.json()["code"] == "index_not_ready"
        assert time.monotonic() < deadline, "the demo domain was not built in time"
        time.sleep(0.5)


@pytest.mark.integration
def test_fresh_server_answers_about_the_readme(tmp_path):
    settings = Settings(
        data_dir=tmp_path / "data",
        server={"port": 0},
        runs={"max_concurrent": 0},
        backbone=BackboneSettings(cache_dir=EMBEDDED_CACHE, dtype="float32"),
    )
    question = {"question": "Which command runs the whole test suite?", "top_k": 3, "max_new_tokens": 24}
    with serve(settings) as served, served.client() as client:
        response = _ask_until_built(client, question)
        assert response.status_code == 200, response.text
        body = response.json()
        assert "make test" in body["answer"].lower()
        supporting = [p for p in body["passages"] if p["supporting"]]
        assert supporting and any("make test" in p["text"] for p in supporting)
        assert body["adapter_version"] is None
        assert client.get("/domains/demo").json()["description"] == settings.demo.description
        # Asked again, every retrieved passage's prefix comes from the passage KV cache: the same answer.
        again = client.post("/ask?domain=demo", json=question)
        assert again.json()["answer"] == body["answer"]
        assert _sample(client.get("/metrics").text, "ragadapt_kv_cache_hits_total") == 3


def _sample(exposition: str, name: str) -> float:
    return next(
        sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.name == name
    )


def test_a_demo_domain_left_without_an_index_is_built_at_the_next_start(make_settings, local_store_settings):
    """A first start stopped while building the demo leaves the domain created but without an index."""
    settings = make_settings(local_store_settings, demo={"enabled": True})
    DomainRegistry(open_store(settings.store_config)).create_domain("demo", settings.demo.description)
    with serve(settings) as served, served.client() as client:
        response = _ask_until_built(client, {"question": "which command runs the tests", "max_new_tokens": 4})
        assert response.status_code == 200, response.text
        assert response.json()["index_version"] is not None

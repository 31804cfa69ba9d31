"""A fresh server on the embedded default backbone builds the demo domain from the README and answers."""

from __future__ import annotations

import time

import pytest

from service.settings import BackboneSettings, Settings
from tests.conftest import EMBEDDED_CACHE
from tests.service.support import serve

pytestmark = pytest.mark.integration


def test_fresh_server_answers_about_the_readme(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", server={"port": 0}, runs={"max_concurrent": 0},
                        backbone=BackboneSettings(cache_dir=EMBEDDED_CACHE, dtype="float32"))
    question = {"question": "Which command runs the whole test suite?", "top_k": 3, "max_new_tokens": 24}
    with serve(settings) as served, served.client() as client:
        deadline = time.monotonic() + 300
        while True:
            response = client.post("/ask?domain=demo", json=question)
            if response.status_code != 503:
                break
            assert response.json()["code"] == "index_not_ready"
            assert time.monotonic() < deadline, "the demo domain was not built in time"
            time.sleep(1)
        assert response.status_code == 200, response.text
        body = response.json()
        assert "make test" in body["answer"].lower()
        supporting = [p for p in body["passages"] if p["supporting"]]
        assert supporting and any("make test" in p["text"] for p in supporting)
        assert body["adapter_version"] is None
        assert client.get("/domains/demo").json()["description"] == settings.demo.description

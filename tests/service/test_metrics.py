"""GET /metrics is valid Prometheus text, and its counters follow the traffic."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from storage import open_store
from tests.service.support import ADMIN, QUESTIONS, ingest_domain, publish_adapter, serve


def _samples(client) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_parse_and_move_with_traffic(local_store_settings, make_settings, direct_backbone, tmp_path):
    settings = make_settings(local_store_settings)
    store = open_store(settings.store_config)
    ingest_domain(store, direct_backbone, "alpha", tmp_path / "corpus")
    version = publish_adapter(store, direct_backbone, "alpha", 7, tmp_path / "adapters")
    with serve(settings) as served, served.client() as client:
        before = _samples(client)
        assert _value(before, "ragadapt_backbone_ready") == 1
        assert (
            _value(
                before,
                "ragadapt_live_version_info",
                domain="alpha",
                adapter_version="base",
                index_version=served.runtime.loaded.catalog.find("alpha").index_version,
            )
            == 1
        )

        promoted = client.post("/admin/domains/alpha/promote", json={"version": version}, headers=ADMIN)
        assert promoted.status_code == 200
        for question in QUESTIONS[:3]:
            asked = client.post("/ask?domain=alpha", json={"question": question, "max_new_tokens": 4})
            assert asked.status_code == 200
        assert client.post("/ask?domain=zzz", json={"question": "what"}).status_code == 404

        after = _samples(client)
        assert _value(after, "ragadapt_ask_requests_total", domain="alpha", code="ok") == 3
        assert _value(after, "ragadapt_ask_requests_total", domain="other", code="domain_not_found") == 1
        for stage in ("queue", "embed", "search", "generate", "total"):
            assert _value(after, "ragadapt_ask_stage_seconds_count", domain="alpha", stage=stage) == 3
        # One question at a time: every decoding step ran exactly one.
        assert _value(after, "ragadapt_batch_rows_sum") == _value(after, "ragadapt_batch_rows_count") > 0
        assert _value(after, "ragadapt_answer_tokens_total", domain="alpha") > 0
        assert _value(after, "ragadapt_adapter_loads_total", result="ok") == 1  # loaded once, at promotion
        assert _value(after, "ragadapt_adapter_cache_hits_total", tier="warm") == 3
        assert _value(after, "ragadapt_adapter_cache_misses_total", tier="hot") == 1
        assert (
            _value(
                after,
                "ragadapt_live_version_info",
                domain="alpha",
                adapter_version=version,
                index_version=served.runtime.loaded.catalog.find("alpha").index_version,
            )
            == 1
        )
        assert (
            _value(
                after,
                "ragadapt_live_version_info",
                domain="alpha",
                adapter_version="base",
                index_version=served.runtime.loaded.catalog.find("alpha").index_version,
            )
            == 0
        )
        assert _value(after, "ragadapt_http_requests_total", method="POST", route="/ask", status="200") == 3
        assert ("ragadapt_queue_depth", ()) in after

"""The model worker batches questions of different domains (and adapters) into one pass per stage."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from adapters import AdapterRegistry
from backbone import Backbone
from indexing.versions import IndexVersions
from service.adapter_cache import AdapterCache
from service.metrics import Metrics
from service.worker import AskJob, ModelWorker
from storage import DomainRegistry, LocalStore
from tests.service.support import QUESTIONS, ingest_domain, publish_adapter


@pytest.fixture
def setup(tmp_path, direct_backbone, tiny_backbone_settings):
    store = LocalStore(tmp_path / "store")
    versions = {}
    for seed, name in enumerate(("alpha", "beta"), start=21):
        ingest_domain(store, direct_backbone, name, tmp_path / "corpus")
        versions[name] = publish_adapter(store, direct_backbone, name, seed, tmp_path / "adapters")
    registry = DomainRegistry(store)
    index_versions = IndexVersions(registry, tmp_path / "indexes")
    backbone = Backbone.load(tiny_backbone_settings.config())  # the worker's own: it attaches and detaches
    handles = {name: index_versions.open_live(name, embedding_dim=backbone.embedding_dim)
               for name in versions}
    loader = ThreadPoolExecutor(2)
    yield store, backbone, versions, handles, loader, tmp_path
    loader.shutdown()


def _run(worker: ModelWorker, cache: AdapterCache, rows: list[tuple[str, str | None]], handles,
         retrieval: str = "dense", top_k: int = 2) -> list:
    """Submit every row before the worker can take its first batch, then collect the results in order."""

    async def main():
        loop = asyncio.get_running_loop()
        jobs = []
        for domain, version in rows:
            adapter = (domain, version) if version is not None else None
            if adapter is not None:
                await asyncio.wrap_future(cache.acquire(*adapter))
            job = AskJob(question=QUESTIONS[len(jobs) % len(QUESTIONS)], domain=domain, adapter=adapter,
                         index=handles[domain], top_k=top_k, max_new_tokens=6, retrieval=retrieval, loop=loop,
                         future=loop.create_future())
            jobs.append(job)
        for job in jobs:
            worker.submit(job)
        return [await job.future for job in jobs], jobs

    return asyncio.run(main())


def _samples(metrics: Metrics, name: str) -> tuple[float, float]:
    registry = metrics.registry
    return registry.get_sample_value(f"{name}_count"), registry.get_sample_value(f"{name}_sum")


@pytest.mark.parametrize("hot_slots", [4, 1])
def test_mixed_domains_share_batches_and_match_direct_answers(setup, direct, hot_slots):
    store, backbone, versions, handles, loader, tmp_path = setup
    metrics = Metrics()
    cache = AdapterCache(backbone, AdapterRegistry(store), tmp_path, loader, hot_slots=hot_slots,
                         warm_bytes=1 << 30, metrics=metrics)
    alpha, beta = ("alpha", versions["alpha"]), ("beta", versions["beta"])
    rows = [alpha, beta, ("alpha", None), beta, alpha, ("beta", None)]
    # A batch waits (up to 2 s) until all rows are in, so how the rows are batched does not depend on timing.
    worker = ModelWorker(backbone, cache, metrics, queue_size=16, max_batch_rows=len(rows), batch_wait_s=2.0)
    worker.start()
    try:
        results, jobs = _run(worker, cache, rows, handles)
    finally:
        worker.stop()

    batches, rows_total = _samples(metrics, "ragadapt_batch_rows")
    _, adapters_total = _samples(metrics, "ragadapt_batch_adapters")
    if hot_slots >= 2:
        # One batch for all six rows: alpha's adapter, beta's adapter and the base backbone side by side.
        assert (batches, rows_total, adapters_total) == (1, len(rows), 3)
    else:
        # One hot slot: the first batch takes alpha's rows (and base rows); beta's wait for the next one.
        assert batches == 2 and rows_total == len(rows)
        assert metrics.registry.get_sample_value("ragadapt_adapter_evictions_total", {"tier": "hot"}) == 1
    pipeline = direct(store)
    for job, result in zip(jobs, results):
        version = job.adapter[1] if job.adapter else None
        expected = pipeline.answer(handles[job.domain], job.question, job.domain, version, top_k=2,
                                   max_new_tokens=6)
        assert result.answer.text == expected
    if hot_slots >= 2:
        assert set(backbone.adapter_sets) == {f"{d}@{v}" for d, v in versions.items()}
    else:
        assert backbone.adapter_sets == [f"beta@{versions['beta']}"]


@pytest.mark.parametrize("retrieval", ["hybrid", "bm25"])
def test_lexical_hits_are_weighed_by_their_dense_scores(setup, retrieval):
    """The generator's document posterior takes query-passage dot products, whatever chose the passages."""
    store, backbone, _, handles, loader, tmp_path = setup
    metrics = Metrics()
    cache = AdapterCache(backbone, AdapterRegistry(store), tmp_path, loader, hot_slots=2, warm_bytes=1 << 30,
                         metrics=metrics)
    worker = ModelWorker(backbone, cache, metrics, queue_size=4, max_batch_rows=1, batch_wait_s=0.0)
    worker.start()
    try:
        results, jobs = _run(worker, cache, [("alpha", None)], handles, retrieval=retrieval, top_k=4)
    finally:
        worker.stop()
    hits, answer = results[0].hits, results[0].answer
    with torch.inference_mode():
        query = backbone.encode_questions([jobs[0].question])  # [1, dim]
        exact = (query @ backbone.encode_passages([hit.passage for hit in hits]).T)[0].tolist()  # [k]
    by_id = dict(zip((hit.passage.id for hit in hits), exact))
    assert answer.supporting
    for support in answer.supporting:
        assert support.score == pytest.approx(by_id[support.passage.id], rel=1e-4, abs=1e-4)
    # The hits themselves keep the retrieval's own scores (what the response reports).
    assert [hit.score for hit in hits] != pytest.approx(exact, rel=1e-3)

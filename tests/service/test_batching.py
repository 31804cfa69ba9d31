"""The model worker answers questions of different domains (and adapters) together, continuously batched."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from adapters import AdapterRef, AdapterRegistry
from backbone import Backbone
from indexing.versions import IndexVersions
from service.adapter_cache import AdapterCache
from service.errors import Overloaded
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
    handles = {
        name: index_versions.open_live(name, embedding_dim=backbone.embedding_dim) for name in versions
    }
    loader = ThreadPoolExecutor(2)
    yield store, backbone, versions, handles, loader, tmp_path
    loader.shutdown()


def _refs(store, versions: dict[str, str]) -> dict[str, AdapterRef]:
    adapters = AdapterRegistry(store)
    return {domain: adapters.ref(domain, version) for domain, version in versions.items()}


def _run(
    worker: ModelWorker,
    cache: AdapterCache,
    rows: list[tuple[str, AdapterRef | None]],
    handles,
    retrieval: str = "dense",
    top_k: int = 2,
) -> list:
    """Submit every row before the worker can take its first batch, then collect the results in order."""

    async def main():
        loop = asyncio.get_running_loop()
        jobs = []
        for domain, adapter in rows:
            if adapter is not None:
                await asyncio.wrap_future(cache.acquire(adapter))
            job = AskJob(
                question=QUESTIONS[len(jobs) % len(QUESTIONS)],
                domain=domain,
                adapter=adapter,
                index=handles[domain],
                top_k=top_k,
                max_new_tokens=6,
                retrieval=retrieval,
                loop=loop,
                future=loop.create_future(),
            )
            jobs.append(job)
        for job in jobs:
            worker.submit(job)
        return [await job.future for job in jobs], jobs

    return asyncio.run(main())


def _worker(
    setup,
    *,
    hot_slots: int,
    max_batch_rows: int,
    batch_wait_s: float,
    queue_size: int = 16,
    kv_cache_bytes: int = 0,
    prefill_chunk_tokens: int = 0,
):
    """A model worker over the setup's backbone with a fresh adapter cache and metrics (not started)."""
    store, backbone, _, _, loader, tmp_path = setup
    metrics = Metrics()
    cache = AdapterCache(
        backbone,
        AdapterRegistry(store),
        tmp_path,
        loader,
        hot_slots=hot_slots,
        warm_bytes=1 << 30,
        metrics=metrics,
    )
    worker = ModelWorker(
        backbone,
        cache,
        metrics,
        queue_size=queue_size,
        max_batch_rows=max_batch_rows,
        batch_wait_s=batch_wait_s,
        kv_cache_bytes=kv_cache_bytes,
        prefill_chunk_tokens=prefill_chunk_tokens,
    )
    return worker, cache, metrics


def _job(loop, handles, question: str, domain: str, adapter, budget: int) -> AskJob:
    return AskJob(
        question=question,
        domain=domain,
        adapter=adapter,
        index=handles[domain],
        top_k=2,
        max_new_tokens=budget,
        retrieval="dense",
        loop=loop,
        future=loop.create_future(),
    )


def _steps(metrics: Metrics, name: str, above: float, at_most: float) -> float:
    """How many decoding steps observed a value in (above, at_most] (bounds must be histogram buckets)."""

    def count(bound: float) -> float:
        return metrics.registry.get_sample_value(f"{name}_bucket", {"le": str(float(bound))}) or 0.0

    return count(at_most) - (count(above) if above > 0 else 0.0)


def _total_steps(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(f"{name}_count") or 0.0


@pytest.mark.parametrize("hot_slots", [4, 1])
def test_mixed_domains_share_batches_and_match_direct_answers(setup, direct, hot_slots):
    store, backbone, versions, handles, _, _ = setup
    refs = _refs(store, versions)
    alpha, beta = ("alpha", refs["alpha"]), ("beta", refs["beta"])
    rows = [alpha, beta, ("alpha", None), beta, alpha, ("beta", None)]
    # The worker waits (up to 2 s) until all rows are in, so which rows start together is not up to timing.
    worker, cache, metrics = _worker(setup, hot_slots=hot_slots, max_batch_rows=len(rows), batch_wait_s=2.0)
    worker.start()
    try:
        results, jobs = _run(worker, cache, rows, handles)
    finally:
        worker.stop()

    steps = _total_steps(metrics, "ragadapt_batch_rows")
    assert steps > 0
    if hot_slots >= 2:
        # All six questions start together: alpha's adapter, beta's adapter and the base backbone at once.
        assert _steps(metrics, "ragadapt_batch_rows", 4, 8) >= 1
        assert _steps(metrics, "ragadapt_batch_adapters", 2, 4) >= 1
    else:
        # One hot slot: no step runs two adapter sets (the base backbone rides along); the sets take turns in
        # queue order, alpha, beta, then alpha again, so the later alpha question waited for the betas.
        assert _steps(metrics, "ragadapt_batch_adapters", 0, 2) == steps
        assert metrics.registry.get_sample_value("ragadapt_adapter_evictions_total", {"tier": "hot"}) == 2
    pipeline = direct(store)
    for job, result in zip(jobs, results):
        version = job.adapter.version if job.adapter else None
        expected = pipeline.answer(
            handles[job.domain], job.question, job.domain, version, top_k=2, max_new_tokens=6
        )
        assert result.answer.text == expected
    if hot_slots >= 2:
        assert set(backbone.adapter_sets) == {f"{d}@{v}" for d, v in versions.items()}
    else:
        assert backbone.adapter_sets == [f"alpha@{versions['alpha']}"]


def test_the_passage_kv_cache_answers_as_a_whole_prefill_and_forgets_detached_adapters(setup, direct):
    store, _, versions, handles, _, _ = setup
    refs = _refs(store, versions)
    alpha, beta = ("alpha", refs["alpha"]), ("beta", refs["beta"])
    # One hot slot: beta's set replaces alpha's, whose cached prefixes must go with it.
    worker, cache, metrics = _worker(
        setup, hot_slots=1, max_batch_rows=4, batch_wait_s=2.0, kv_cache_bytes=1 << 30
    )
    worker.start()
    try:
        # Four questions on alpha's top 3 (a small corpus: they share passages), under alpha's set and the
        # base; then beta's set takes the slot; then the four again: the base rows' prefixes are hits, alpha's
        # set is attached anew and gets none of its old prefixes.
        first = _run(worker, cache, [alpha, ("alpha", None)] * 2, handles, top_k=3)
        between = _run(worker, cache, [beta], handles, top_k=3)
        again = _run(worker, cache, [alpha, ("alpha", None)] * 2, handles, top_k=3)
    finally:
        worker.stop()

    def value(name: str, **labels) -> float:
        return metrics.registry.get_sample_value(name, labels) or 0.0

    pipeline = direct(store)
    for results, jobs in (first, between, again):
        for job, result in zip(jobs, results):
            version = job.adapter.version if job.adapter else None
            expected = pipeline.answer(
                handles[job.domain], job.question, job.domain, version, top_k=3, max_new_tokens=6
            )
            assert result.answer.text == expected
    assert value("ragadapt_kv_cache_hits_total") > 0 and value("ragadapt_kv_cache_misses_total") > 0
    assert value("ragadapt_kv_cache_evictions_total", reason="adapter") > 0  # alpha's, then beta's
    assert value("ragadapt_kv_cache_evictions_total", reason="budget") == 0
    assert 0 < value("ragadapt_kv_cache_bytes") <= 1 << 30


@pytest.mark.parametrize("chunk", [0, 8])
def test_a_question_joins_the_one_in_flight_and_is_answered_first(setup, direct, chunk):
    """Continuous batching: a short question asked while a long answer decodes does not wait for it, whether
    its prompt is prefilled at once or in chunks between the long answer's steps."""
    store, backbone, versions, handles, _, _ = setup
    worker, cache, metrics = _worker(
        setup, hot_slots=2, max_batch_rows=4, batch_wait_s=0.0, prefill_chunk_tokens=chunk
    )
    saved, backbone.generator.eos_ids = backbone.generator.eos_ids, []  # rows end at their token budget only

    async def main():
        loop = asyncio.get_running_loop()
        beta = _refs(store, versions)["beta"]
        await asyncio.wrap_future(cache.acquire(beta))

        long = _job(loop, handles, QUESTIONS[0], "alpha", None, 600)
        short = _job(loop, handles, QUESTIONS[1], "beta", beta, 3)
        answered = []
        for item in (long, short):
            item.future.add_done_callback(lambda _, item=item: answered.append(item))
        worker.submit(long)
        while not long.generating_since:
            await asyncio.sleep(0.001)
        worker.submit(short)
        await asyncio.gather(long.future, short.future)
        return answered, short

    worker.start()
    try:
        answered, short = asyncio.run(main())
    finally:
        worker.stop()
        backbone.generator.eos_ids = saved
    assert [job.max_new_tokens for job in answered] == [3, 600]
    assert _steps(metrics, "ragadapt_batch_adapters", 1, 2) >= 1  # base and beta decoded side by side
    result = short.future.result()
    expected = direct(store).answer(
        handles["beta"], short.question, "beta", versions["beta"], top_k=2, max_new_tokens=3
    )
    assert result.answer.text == expected
    timings = result.timings
    # Its first token came after its prefill, which follows queue, embed and search (and an adapter attach).
    assert timings["queue"] + timings["embed"] + timings["search"] < timings["first_token"]
    real = metrics.registry.get_sample_value("ragadapt_prefill_tokens_total", {"kind": "real"})
    padding = metrics.registry.get_sample_value("ragadapt_prefill_tokens_total", {"kind": "padding"})
    assert real > 0 and padding <= real / 8


def test_a_question_that_fails_to_start_leaves_those_in_flight_unharmed(setup, monkeypatch):
    _, backbone, _, handles, _, _ = setup
    worker, _, _ = _worker(setup, hot_slots=2, max_batch_rows=4, batch_wait_s=0.0)
    encode = backbone.encode_questions

    def encode_or_fail(questions, adapters=None):  # a fault no real input provokes reliably
        if "boom" in questions:
            raise RuntimeError("the question encoder failed")
        return encode(questions, adapters)

    monkeypatch.setattr(backbone, "encode_questions", encode_or_fail)
    monkeypatch.setattr(backbone.generator, "eos_ids", [])  # rows end at their token budget only

    async def main():
        loop = asyncio.get_running_loop()
        long = _job(loop, handles, QUESTIONS[0], "alpha", None, 200)
        worker.submit(long)
        while not long.generating_since:
            await asyncio.sleep(0.001)
        failing = _job(loop, handles, "boom", "alpha", None, 3)
        worker.submit(failing)
        outcomes = await asyncio.gather(long.future, failing.future, return_exceptions=True)
        later = _job(loop, handles, QUESTIONS[1], "alpha", None, 3)
        worker.submit(later)
        return outcomes, await later.future, long

    worker.start()
    try:
        (answered, failed), later, long = asyncio.run(main())
    finally:
        worker.stop()
    assert isinstance(failed, RuntimeError)
    with torch.inference_mode():
        alone = backbone.answer(
            [long.question], [[hit.passage for hit in answered.hits]], [long.doc_scores], max_new_tokens=200
        )[0]
    assert answered.answer.text == alone.text  # the failure beside it changed nothing
    assert later.answer.text  # and the worker still answers


def test_requests_nobody_waits_for_give_their_queue_places_to_new_ones(setup):
    """A full queue first drops the entries whose clients already got 504 (or whose time is up), instead of
    refusing new requests until the worker reaches them."""
    store, backbone, versions, handles, _, _ = setup
    worker, cache, _metrics = _worker(setup, hot_slots=2, max_batch_rows=1, batch_wait_s=0.0, queue_size=2)
    alpha = _refs(store, versions)["alpha"]

    async def main():
        loop = asyncio.get_running_loop()
        long = _job(loop, handles, QUESTIONS[0], "alpha", None, 600)
        worker.submit(long)
        while not long.generating_since:
            await asyncio.sleep(0.001)
        await asyncio.wrap_future(cache.acquire(alpha))  # its lease passes to the worker with the job
        gave_up = _job(loop, handles, QUESTIONS[1], "alpha", alpha, 3)
        expired = _job(loop, handles, QUESTIONS[2], "alpha", None, 3)
        worker.submit(gave_up)
        worker.submit(expired)
        with pytest.raises(Overloaded):
            worker.submit(_job(loop, handles, QUESTIONS[3], "alpha", None, 3))
        gave_up.cancelled = True  # what the HTTP layer does when it answers 504
        expired.deadline = time.perf_counter()  # its 504 is due now
        fresh = _job(loop, handles, QUESTIONS[4], "alpha", None, 3)
        worker.submit(fresh)
        assert worker.depth == 1
        with pytest.raises(TimeoutError):
            await expired.future
        long.cancelled = True
        return await fresh.future

    saved, backbone.generator.eos_ids = backbone.generator.eos_ids, []  # rows end at their token budget only
    worker.start()
    try:
        answered = asyncio.run(main())
    finally:
        worker.stop()
        backbone.generator.eos_ids = saved
    assert answered.hits and answered.timings["generate"] > 0  # the new request was answered


@pytest.mark.parametrize("retrieval", ["hybrid", "bm25"])
def test_lexical_hits_are_weighed_by_their_dense_scores(setup, retrieval):
    """The generator's document posterior takes query-passage dot products, whatever chose the passages."""
    _, backbone, _, handles, _, _ = setup
    worker, cache, _ = _worker(setup, hot_slots=2, max_batch_rows=1, batch_wait_s=0.0)
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

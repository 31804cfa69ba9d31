"""Rebuilds in a worker process: queries keep working, failures and kills leave the old index live."""

import json
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

from indexing.encoder import EncodeConfig
from indexing.errors import RebuildCancelled, RebuildFailed
from indexing.ingest import ingest
from indexing.rebuild import RebuildJob, RebuildSpec, RebuildState
from indexing.versions import IndexVersions
from storage import DomainRegistry, LocalStore

TIMEOUT = 120


def write_corpus(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def domain(tmp_path, tiny_config, tiny_backbone, corpus):
    """Domain "news" on a LocalStore, with the small corpus ingested and live."""
    store = LocalStore(tmp_path / "store")
    path = write_corpus(tmp_path / "first.jsonl", [p.__dict__ for p in corpus])
    first = ingest("news", path, store, tiny_config, backbone=tiny_backbone)
    versions = IndexVersions(DomainRegistry(store), tmp_path / "cache")
    return versions, first


@pytest.fixture
def slow_corpus(tmp_path):
    """Enough passages, encoded one at a time, that a rebuild is still encoding when the test acts on it."""
    return write_corpus(
        tmp_path / "slow.jsonl",
        [
            {"id": f"s{i}", "title": "slow", "text": f"the capital of france is paris {i}"}
            for i in range(20_000)
        ],
    )


def wait_until_encoding(job: RebuildJob) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not (job.progress.stage == "encoding" and job.progress.done > 0):
        assert not job.status.finished, job.error
        assert time.monotonic() < deadline, "the worker never started encoding"
        time.sleep(0.05)


def test_queries_during_a_rebuild_see_one_whole_version_then_the_new_one(
    domain, tmp_path, tiny_config, tiny_backbone
):
    versions, first = domain
    dim = tiny_backbone.embedding_dim
    # What a server does: one reference to the handle that answers, read whole and replaced whole.
    live = {"news": versions.open("news", first.index_version, embedding_dim=dim)}
    new_corpus = write_corpus(
        tmp_path / "new.jsonl",
        [{"id": f"new-{i}", "title": "New", "text": f"fresh words {i}"} for i in range(200)],
    )
    job = RebuildJob(
        RebuildSpec("news", tiny_config, passages=new_corpus),
        versions,
        tmp_path / "work",
        on_success=lambda r: live.update(news=versions.open("news", r.index_version, embedding_dim=dim)),
    )
    queries = np.random.default_rng(0).standard_normal((4, dim)).astype(np.float32)
    seen, problems, stop = [], [], threading.Event()

    def query_forever():
        while not stop.is_set():
            try:
                handle = live["news"]
                rows = handle.search(queries, ["capital paris"] * 4, k=5, mode="hybrid")
                ids = {h.passage.id for row in rows for h in row}
                expected_new = handle.version != first.index_version
                if any(r and len(r) != 5 for r in rows) or any(
                    i.startswith("new-") != expected_new for i in ids
                ):
                    problems.append((handle.version, sorted(ids)))
                seen.append(handle.version)
                time.sleep(0.005)  # leave the worker some CPU: a reader, not a load test
            except Exception as exc:
                problems.append(repr(exc))

    reader = threading.Thread(target=query_forever)
    reader.start()
    try:
        assert job.status is RebuildState.PENDING
        result = job.start().result(timeout=TIMEOUT)
        time.sleep(0.2)
    finally:
        stop.set()
        reader.join()
    assert problems == []
    assert result.flipped and job.status is RebuildState.SUCCEEDED and job.error is None
    assert seen[0] == first.index_version and seen[-1] == result.index_version
    assert seen.count(first.index_version) > 0 and seen.count(result.index_version) > 0
    pointer = versions.live("news")
    assert (pointer.index_version, pointer.passages_version) == (
        result.index_version,
        result.passages_version,
    )
    assert result.passages_version != first.passages_version and result.info.passage_count == 200
    assert job.progress.stage == "done"


def test_rebuild_with_an_adapter_from_live_passages_without_flipping(
    domain, tmp_path, tiny_config, tiny_backbone
):
    versions, first = domain
    tiny_backbone.add_adapter_set("rebuild-test")
    # A seeded perturbation: from the global generator it depended on which tests ran before, and some draws
    # put another passage's dot product above passage 0's own.
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for param in tiny_backbone.trainable_parameters("rebuild-test")["passage"]:
            param.add_(torch.randn(param.shape, generator=generator) * 0.5)
    tiny_backbone.save_adapter_set("rebuild-test", tmp_path / "adapter")
    spec = RebuildSpec(
        "news", tiny_config, adapter_dir=tmp_path / "adapter", adapter_version="a1", flip=False
    )
    result = RebuildJob(spec, versions, tmp_path / "work").start().result(timeout=TIMEOUT)
    assert not result.flipped
    assert versions.live("news").index_version == first.index_version
    assert versions.versions("news") == [first.index_version, result.index_version]
    assert result.passages_version == first.passages_version
    info = versions.build_info("news", result.index_version)
    assert info.adapter_version == "a1" and info.passage_adapter != "base"
    handle = versions.open("news", result.index_version, embedding_dim=tiny_backbone.embedding_dim)
    with torch.inference_mode():
        query = tiny_backbone.encode_passages([handle.passages[0]], "rebuild-test")  # [1, dim]
    assert handle.search(query, k=1, mode="dense")[0][0].passage == handle.passages[0]
    assert handle.search(query, k=1, mode="dense")[0][0].score == pytest.approx(
        float(query @ query.T), rel=1e-4
    )


def test_a_rebuild_the_worker_fails_leaves_the_old_version_live_and_says_why(domain, tmp_path, tiny_config):
    versions, first = domain
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "text": \n')
    job = RebuildJob(RebuildSpec("news", tiny_config, passages=bad), versions, tmp_path / "work").start()
    with pytest.raises(RebuildFailed, match=r"bad\.jsonl:2"):
        job.result(timeout=TIMEOUT)
    assert job.status is RebuildState.FAILED and job.error_code == "malformed_passages"
    assert "bad.jsonl:2" in job.error
    assert versions.live("news").index_version == first.index_version
    assert versions.versions("news") == [first.index_version]
    assert not any((tmp_path / "work" / "news").glob("job-*"))


def test_a_killed_worker_is_detected_and_the_old_version_stays_live(
    domain, tmp_path, tiny_config, slow_corpus
):
    versions, first = domain
    spec = RebuildSpec(
        "news", tiny_config, passages=slow_corpus, encode=EncodeConfig(batch_size=1, progress=False)
    )
    job = RebuildJob(spec, versions, tmp_path / "work").start()
    wait_until_encoding(job)
    os.kill(job.pid, signal.SIGKILL)
    with pytest.raises(RebuildFailed, match="SIGKILL"):
        job.result(timeout=30)
    assert job.error_code == "worker_died"
    assert versions.live("news").index_version == first.index_version
    assert versions.versions("news") == [first.index_version]


def test_cancel_stops_the_worker_and_publishes_nothing(domain, tmp_path, tiny_config, slow_corpus):
    versions, first = domain
    spec = RebuildSpec(
        "news", tiny_config, passages=slow_corpus, encode=EncodeConfig(batch_size=1, progress=False)
    )
    job = RebuildJob(spec, versions, tmp_path / "work").start()
    wait_until_encoding(job)
    pid = job.pid
    assert job.cancel()
    with pytest.raises(RebuildCancelled):
        job.result(timeout=30)
    assert job.status is RebuildState.CANCELLED and job.progress.done < 20_000
    assert not job.cancel()  # already over
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the worker is gone, not orphaned
    assert versions.live("news").index_version == first.index_version
    assert versions.versions("news") == [first.index_version]


def test_a_job_cancelled_before_it_starts_never_runs(domain, tmp_path, tiny_config):
    versions, _ = domain
    job = RebuildJob(RebuildSpec("news", tiny_config), versions, tmp_path / "work")
    assert job.cancel()
    assert job.start().status is RebuildState.CANCELLED and job.pid is None
    with pytest.raises(RebuildCancelled):
        job.result(timeout=1)

"""Ray Data re-encoding: of a real shared domain with the embedded default backbone, the same embeddings as
the local pipeline and the same search results; a build resumed on another host from the shards in the
store."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from indexing.builder import IndexConfig, build_faiss
from indexing.chunking import read_passages
from indexing.encoder import EncodeConfig, encode_passages
from indexing.ray_encoding import RayEncoding
from indexing.rebuild import RebuildJob, RebuildSpec
from indexing.versions import IndexVersions
from storage import DomainRegistry
from tests.adapters.conftest import make_domain

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "conversations"


@pytest.mark.integration
def test_ray_data_encodes_a_shared_domain_as_the_local_pipeline_does(
    ray_cluster, embedded_backbone, tmp_path
):
    if not (DATA / "passages.jsonl").is_file():
        pytest.skip(f"shared data not found at {DATA}")
    passages = read_passages(DATA / "passages.jsonl")
    assert len(passages) == 1029
    local = encode_passages(embedded_backbone, passages, config=EncodeConfig(progress=False))  # [n, dim]
    progress = []
    on_ray = encode_passages(
        embedded_backbone,
        passages,
        config=EncodeConfig(
            progress=False, shard_size=256, ray=RayEncoding(ray_cluster, batch_size=64, concurrency=2)
        ),
        work_dir=tmp_path / "shards",
        on_progress=lambda done, total: progress.append((done, total)),
    )  # [n, dim]
    assert progress[-1] == (1029, 1029)
    cosine = (local * on_ray).sum(1) / np.linalg.norm(local, axis=1) / np.linalg.norm(on_ray, axis=1)  # [n]
    assert cosine.min() >= 0.9999, f"lowest cosine {cosine.min():.6f}"

    questions = [json.loads(line) for line in (DATA / "qa.jsonl").read_text().splitlines()]
    asked = [q["question"] for q in questions if q["split"] == "dev"]
    query = embedded_backbone.encode_questions(asked).float().numpy()  # [q, dim]
    _, found_local = build_faiss(local, "Flat").search(query, 5)  # [q, 5]
    _, found_on_ray = build_faiss(on_ray, "Flat").search(query, 5)
    # The same five passages for every question. In bf16 a batch's padding moves embeddings by ~1e-3, so
    # near-ties may swap places: the local pipeline itself, at batch size 32 instead of 64, reorders 10 of
    # these 252 lists and changes the passages of 5; Ray Data reordered 2 and changed none.
    assert [set(row) for row in found_local] == [set(row) for row in found_on_ray]
    assert (found_local == found_on_ray).all(1).mean() >= 0.98


def test_a_ray_build_resumes_from_the_shards_another_host_left_in_the_store_then_drops_them(
    ray_cluster, tiny_config, tiny_backbone, tmp_path
):
    domain = make_domain(tmp_path / "domain", tiny_config, tiny_backbone)
    versions = IndexVersions(DomainRegistry(domain.store), tmp_path / "versions")
    live = versions.live("toy")
    passages = read_passages(versions.fetch_passages("toy", live.passages_version, tmp_path / "live"))
    # What a host that died mid-build left: the identity and the first shard, marked so its use shows.
    encode = EncodeConfig(progress=False, shard_size=8, keep_shards=True)
    encode_passages(tiny_backbone, passages, config=encode, work_dir=tmp_path / "dead-host")
    [left] = (tmp_path / "dead-host").glob("shards-*")
    marked = np.full((8, tiny_backbone.embedding_dim), 0.25, dtype=np.float32)
    np.save(left / "shard-00000.npy", marked)
    for name in ("identity.json", "shard-00000.npy"):
        domain.store.put_file(f"shards/toy/{left.name}/{name}", left / name)
    other = "shards/toy/shards-of-another-encoder/identity.json"
    domain.store.put_bytes(other, b"{}")

    spec = RebuildSpec(
        domain="toy",
        backbone=tiny_config,
        index=IndexConfig(retrieval="dense", save_embeddings=True),
        encode=dataclasses.replace(encode, keep_shards=False, ray=RayEncoding(ray_cluster, batch_size=4)),
    )
    result = RebuildJob(spec, versions, tmp_path / "this-host").start().result(timeout=300)

    assert result.flipped and result.info.encoded_on == "ray"
    embeddings = np.load(result.directory / "embeddings.npy")  # [n, dim]
    assert (embeddings[:8] == marked).all()  # taken from the store, not encoded again
    fresh = encode_passages(tiny_backbone, passages[8:], config=EncodeConfig(progress=False))
    np.testing.assert_allclose(embeddings[8:], fresh, atol=1e-5)
    # The build is done: its copies are gone, another encoder's stay.
    assert [info.key for info in domain.store.list("shards/toy/")] == [other]

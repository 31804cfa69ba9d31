"""Ingest into a real LocalStore, index versions on the store, the local cache and the live pointer."""

import json

import numpy as np
import pytest

from indexing.errors import (
    AdapterMismatch,
    DimensionMismatch,
    EmptyCorpus,
    EncoderMismatch,
    IndexNotReady,
    IndexVersionNotFound,
    LiveIndexMoved,
    MalformedPassages,
)
from indexing.ingest import ingest
from indexing.versions import IndexVersions
from storage import DomainNotFound, DomainRegistry, IntegrityError, LocalStore


def write_corpus(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "store")


@pytest.fixture
def versions(store, tmp_path):
    return IndexVersions(DomainRegistry(store), tmp_path / "cache")


@pytest.fixture
def first(tmp_path, store, tiny_config, tiny_backbone, corpus):
    path = write_corpus(tmp_path / "first.jsonl", [p.__dict__ for p in corpus])
    return ingest("news", path, store, tiny_config, backbone=tiny_backbone)


def test_ingest_publishes_passages_and_index_and_makes_them_live(first, versions, tiny_backbone, corpus):
    pointer = versions.live("news")
    assert (pointer.index_version, pointer.passages_version) == (first.index_version, first.passages_version)
    assert versions.versions("news") == [first.index_version]
    info = versions.build_info("news", first.index_version)
    assert info.passages_version == first.passages_version
    assert (info.dim, info.factory, info.passage_count) == (tiny_backbone.embedding_dim, "Flat", len(corpus))
    assert info.encoder_fingerprint == tiny_backbone.fingerprint and info.adapter_version is None
    handle = versions.open_live(
        "news", embedding_dim=tiny_backbone.embedding_dim, fingerprint=tiny_backbone.fingerprint
    )
    assert handle.key == ("news", first.index_version) and handle.size == len(corpus)
    query = tiny_backbone.encode_passages([corpus[3]]).detach()
    [row] = handle.search(query, [corpus[3].text], k=1, mode="hybrid")
    assert row[0].passage == corpus[3]


def test_a_second_ingest_adds_versions_and_keeps_the_old_one_intact(
    first, tmp_path, store, versions, tiny_config, tiny_backbone
):
    old_dir = versions.fetch("news", first.index_version)
    old_files = {p.name: p.read_bytes() for p in old_dir.iterdir() if p.is_file()}
    path = write_corpus(
        tmp_path / "second.jsonl", [{"id": "n1", "title": "New", "text": "brand new passage"}]
    )
    second = ingest("news", path, store, tiny_config, backbone=tiny_backbone)
    assert versions.versions("news") == [first.index_version, second.index_version]
    assert versions.live("news").index_version == second.index_version
    assert {p.name: p.read_bytes() for p in old_dir.iterdir() if p.is_file()} == old_files
    old = versions.open("news", first.index_version, embedding_dim=tiny_backbone.embedding_dim)
    new = versions.open("news", second.index_version, embedding_dim=tiny_backbone.embedding_dim)
    assert (old.size, new.size) == (30, 1)


def test_a_corrupted_stored_file_is_refused_and_nothing_is_cached(first, store, tmp_path, tiny_backbone):
    [stored] = (tmp_path / "store" / "objects").rglob(f"{first.index_version}/index.faiss")
    stored.write_bytes(stored.read_bytes()[:-8] + b"tampered")
    fresh = IndexVersions(DomainRegistry(store), tmp_path / "other-cache")
    with pytest.raises(IntegrityError):
        fresh.open("news", first.index_version, embedding_dim=tiny_backbone.embedding_dim)
    assert not (tmp_path / "other-cache" / "news" / "indexes" / first.index_version).exists()


def test_opening_checks_dimension_and_encoder(first, versions, tiny_backbone):
    with pytest.raises(DimensionMismatch):
        versions.open("news", first.index_version, embedding_dim=384)
    with pytest.raises(EncoderMismatch):
        versions.open(
            "news", first.index_version, embedding_dim=tiny_backbone.embedding_dim, fingerprint="other"
        )


def test_make_live_refuses_a_moved_pointer_or_another_adapter(first, versions):
    with pytest.raises(LiveIndexMoved):
        versions.make_live("news", first.index_version, replacing="20200101T000000Z-abcdef")
    with pytest.raises(AdapterMismatch):
        versions.make_live("news", first.index_version, adapter_version="20200101T000000Z-abcdef")
    assert versions.live("news").index_version == first.index_version


def test_unknown_domains_versions_and_domains_without_an_index(versions, tiny_backbone):
    with pytest.raises(DomainNotFound) as caught:
        versions.live("nowhere")
    assert (caught.value.code, caught.value.status) == ("domain_not_found", 404)
    versions.registry.create_domain("empty")
    with pytest.raises(IndexNotReady):
        versions.open_live("empty", embedding_dim=tiny_backbone.embedding_dim)
    with pytest.raises(IndexVersionNotFound):
        versions.open("empty", "20200101T000000Z-abcdef", embedding_dim=tiny_backbone.embedding_dim)


def test_an_invalid_corpus_publishes_nothing(tmp_path, store, versions, tiny_config, tiny_backbone):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "ok"}\nnot json\n')
    with pytest.raises(MalformedPassages):
        ingest("news", bad, store, tiny_config, backbone=tiny_backbone)
    with pytest.raises(EmptyCorpus):
        ingest("news", write_corpus(tmp_path / "empty.jsonl", []), store, tiny_config, backbone=tiny_backbone)
    assert list(store.list("domains/")) == []


def test_ingest_chunks_documents_and_keeps_a_cached_copy(tmp_path, store, tiny_config, tiny_backbone):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "guide.md").write_text("# Guide\n" + " ".join(f"word{i}" for i in range(250)))
    result = ingest("guides", docs, store, tiny_config, backbone=tiny_backbone, cache_dir=tmp_path / "cache")
    assert result.passage_count == 3
    cached = tmp_path / "cache" / "guides" / "indexes" / result.index_version
    assert (
        cached / "build.json"
    ).is_file()  # adopted into the cache: a server here opens it without download
    handle = IndexVersions(DomainRegistry(store), tmp_path / "cache").open_live(
        "guides", embedding_dim=tiny_backbone.embedding_dim
    )
    assert [p.id for p in handle.passages] == ["guide-000", "guide-001", "guide-002"]
    assert {p.title for p in handle.passages} == {"Guide"}
    np.testing.assert_equal(handle.size, 3)

"""End to end on real data: ingest the shared conversations domain with the embedded default backbone."""

import json
from pathlib import Path

import pytest
import torch

from indexing.builder import IndexConfig
from indexing.ingest import ingest
from indexing.versions import IndexVersions
from storage import DomainRegistry, LocalStore

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
PASSAGES = DATA / "conversations" / "passages.jsonl"

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def conversations(embedded_backbone, tmp_path_factory):
    if not PASSAGES.is_file():
        pytest.skip(f"shared data not found at {DATA}")
    root = tmp_path_factory.mktemp("conversations")
    store = LocalStore(root / "store")
    result = ingest(
        "conversations",
        PASSAGES,
        store,
        embedded_backbone.config,
        backbone=embedded_backbone,
        index=IndexConfig(retrieval="hybrid"),
    )
    return result, IndexVersions(DomainRegistry(store), root / "cache")


def test_ingest_builds_and_publishes_the_whole_corpus(conversations, embedded_backbone):
    result, versions = conversations
    assert result.passage_count == 1029
    info = versions.build_info("conversations", result.index_version)
    assert (info.dim, info.factory, info.passage_count) == (384, "Flat", 1029)
    assert info.dtype == str(embedded_backbone.dtype).removeprefix("torch.")
    assert info.encoder_fingerprint == embedded_backbone.fingerprint
    pointer = versions.live("conversations")
    assert (pointer.index_version, pointer.passages_version) == (
        result.index_version,
        result.passages_version,
    )


def test_dev_questions_find_their_gold_passages(conversations, embedded_backbone):
    _result, versions = conversations
    handle = versions.open_live(
        "conversations",
        embedding_dim=embedded_backbone.embedding_dim,
        fingerprint=embedded_backbone.fingerprint,
    )
    dev = [json.loads(line) for line in (DATA / "conversations" / "qa.jsonl").read_text().splitlines()]
    dev = [q for q in dev if q["split"] == "dev"]
    questions = [q["question"] for q in dev]
    with torch.inference_mode():
        queries = embedded_backbone.encode_questions(questions)  # [252, 384]
    recall = {}
    for mode in ("dense", "bm25", "hybrid"):
        rows = handle.search(queries, questions, k=20, mode=mode)
        recall[mode] = sum(
            bool({h.passage.id for h in row} & set(q["passage_ids"])) for q, row in zip(dev, rows)
        ) / len(dev)
    assert handle.config.retrieval == "hybrid"
    assert recall["hybrid"] >= max(recall["dense"], recall["bm25"]) - 0.02, recall
    assert recall["hybrid"] >= 0.6, recall

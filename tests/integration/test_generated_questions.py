"""Generated questions on real passages with the embedded default generator: round-trip consistent and the
same every time."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from adapters.qa import QaExample
from adapters.synthetic import GenerationConfig, generate_questions
from backbone import Passage, normalize_answer
from indexing.builder import IndexConfig, build_index
from indexing.encoder import EncodeConfig
from indexing.searcher import IndexHandle

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "finance"

pytestmark = pytest.mark.integration


def test_generated_questions_are_round_trip_consistent_and_deterministic(embedded_backbone, tmp_path):
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA}")
    rows = [json.loads(line) for line in (DATA / "passages.jsonl").read_text().splitlines()][:400]
    passages = [Passage(r["id"], r["title"], r["text"]) for r in rows]
    ids = {p.id for p in passages}
    examples = []
    for line in (DATA / "qa.jsonl").read_text().splitlines():
        q = json.loads(line)
        if q["split"] == "train" and set(q["passage_ids"]) <= ids:
            examples.append(QaExample(q["question"], tuple(q["answers"]), tuple(q["passage_ids"]), "train"))
    build_index(
        embedded_backbone,
        passages,
        tmp_path / "index",
        build_id="t",
        config=IndexConfig(),
        encode=EncodeConfig(progress=False),
    )
    index = IndexHandle.open(tmp_path / "index", domain="finance")
    sample = random.Random(5).sample(passages, 16)
    config = GenerationConfig(max_passages=16, max_new_tokens=32)

    kept = generate_questions(embedded_backbone, sample, examples, index, config)
    assert len(kept) >= 3, kept  # about a third pass on finance
    by_id = {p.id: p for p in passages}
    dense = index.search(embedded_backbone.encode_questions([e.question for e in kept]), k=20, mode="dense")
    for example, hits in zip(kept, dense):
        (pid,) = example.passage_ids
        assert example.split == "synthetic" and example.question.endswith("?")
        assert normalize_answer(example.answers[0]) in normalize_answer(
            by_id[pid].text
        )  # a span of its passage
        found = {h.passage.id for h in hits} | {
            h.passage.id for h in index.search(query_texts=[example.question], k=20, mode="bm25")[0]
        }
        assert pid in found  # the round trip finds its passage
    assert generate_questions(embedded_backbone, sample, examples, index, config) == kept

"""`ragadapt ingest`: a corpus (and QA set) into a domain of the store, encoded with its live adapter."""

from __future__ import annotations

import json

from adapters.qa import QaSets
from service.cli import main
from storage import DomainRegistry, LocalStore
from tests.service.support import corpus, publish_adapter


def _env(monkeypatch, tmp_path, backbone_settings) -> None:
    monkeypatch.setenv("RAGADAPT_DATA_DIR", str(tmp_path / "data"))
    for field in (
        "question_encoder",
        "passage_encoder",
        "generator",
        "dtype",
        "max_passage_tokens",
        "max_answer_tokens",
    ):
        monkeypatch.setenv(f"RAGADAPT_BACKBONE__{field.upper()}", str(getattr(backbone_settings, field)))


def test_ingest_publishes_passages_index_and_qa(
    monkeypatch, tmp_path, capsys, tiny_backbone_settings, direct_backbone
):
    _env(monkeypatch, tmp_path, tiny_backbone_settings)
    passages = tmp_path / "passages.jsonl"
    passages.write_text(
        "".join(json.dumps({"id": p.id, "title": p.title, "text": p.text}) + "\n" for p in corpus())
    )
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "what is the capital of france", "answers": ["paris"]}) + "\n")

    assert main(["ingest", "--domain", "toy", "--passages", str(passages), "--qa", str(qa)]) == 0
    first = json.loads(capsys.readouterr().out)
    store = LocalStore(tmp_path / "data" / "store")
    live = DomainRegistry(store).live("toy")
    assert (live.index_version, live.adapter_version) == (first["index_version"], None)
    assert first["passages"] == len(corpus()) and first["qa_examples"] == 1
    assert QaSets(store).latest("toy").metadata["count"] == 1

    # Once the domain serves an adapter, a new corpus is encoded with that adapter's passage encoder.
    version = publish_adapter(store, direct_backbone, "toy", 31, tmp_path / "adapters")
    DomainRegistry(store).promote("toy", version)
    assert main(["ingest", "--domain", "toy", "--passages", str(passages)]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["adapter_version"] == version
    index = DomainRegistry(store).read_manifest("toy", "indexes", second["index_version"])
    assert index.metadata["adapter_version"] == version
    assert DomainRegistry(store).live("toy").index_version == second["index_version"]

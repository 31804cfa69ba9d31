"""Training data from a domain's passages: inverse-cloze pairs, generated questions, and what the retriever
phase does with them (on the tiny models); a run with synthetic data alone."""

from __future__ import annotations

import random

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

from adapters.cli import adapt
from adapters.execution import Workspace
from adapters.records import RunStore
from adapters.registry import AdapterRegistry
from adapters.spec import RunRequest, RunState
from adapters.synthetic import (
    GenerationConfig,
    SyntheticCache,
    answer_candidates,
    ict_pairs,
    parse_question,
    qa_pairs,
    sentences,
)
from adapters.training import Trainer, TrainerState, hard_negatives
from backbone import AdapterSetConfig, Passage
from indexing.versions import IndexVersions
from storage import DomainRegistry, artifacts

from .conftest import QA, TOPICS

PASSAGES = [
    Passage("a", "Harbour", "The harbour was dredged in 1932. Steamships dock at the north pier since then."),
    Passage("b", "Lighthouse", "The lighthouse is red and white.\nIts lamp can be seen 18 miles out to sea."),
    Passage("c", "Short", "Too short."),
]


def test_inverse_cloze_pairs_are_sentences_of_their_passage_and_the_same_for_a_seed():
    pairs = ict_pairs(PASSAGES, seed=3, min_words=4)
    assert [p.gold for p in pairs] == [("a",), ("b",)]  # "Too short." has no sentence of 4 words
    for pair in pairs:
        source = next(p for p in PASSAGES if p.id == pair.gold[0])
        assert pair.query in sentences(source.text, min_words=4, max_words=64)
        assert pair.positive == source and pair.kind == "ict"  # keep_sentence=1: the passage as indexed
    assert ict_pairs(PASSAGES, seed=3, min_words=4) == pairs
    assert {p.query for s in range(10) for p in ict_pairs(PASSAGES, seed=s, min_words=4)} > {
        p.query for p in pairs
    }
    for pair in ict_pairs(PASSAGES, seed=3, min_words=4, keep_sentence=0.0):
        assert pair.query not in pair.positive.text and pair.positive.id == pair.gold[0]


def test_qa_pairs_keep_questions_whose_gold_passages_are_in_the_knowledge_base():
    passages = [Passage(f"{t.lower()}-0", t, text) for t, text in TOPICS]
    pairs = qa_pairs(QA, passages)
    assert [p.query for p in pairs] == [
        e.question for e in QA if e.passage_ids[0] in {p.id for p in passages}
    ]
    assert all(p.positive.id == p.gold[0] for p in pairs)


@given(
    ranked=st.lists(st.sampled_from([f"p{i}" for i in range(30)]), unique=True, max_size=30),
    gold=st.lists(st.sampled_from([f"p{i}" for i in range(30)]), unique=True, min_size=1, max_size=5),
    count=st.integers(0, 12),
    seed=st.integers(0, 1000),
)
def test_hard_negatives_never_include_a_gold_passage(ranked, gold, count, seed):
    chosen = hard_negatives(ranked, tuple(gold), count, random.Random(seed))
    assert not set(chosen) & set(gold)
    assert set(chosen) <= set([p for p in ranked if p not in gold][:10])
    assert len(chosen) == min(count, len([p for p in ranked if p not in gold][:10]))


def test_answer_candidates_and_question_parsing():
    text = "Revenue was $1,305 million in 2019, up 4.5% from Acme Holdings and Port Elm."
    candidates = answer_candidates(text)
    assert {"$1,305 million", "2019", "4.5%", "Acme Holdings", "Port Elm"} <= set(candidates)
    assert parse_question("Question: What was the revenue in 2019?\nmore", "$1,305 million") == (
        "What was the revenue in 2019?"
    )
    assert (
        parse_question("What was the revenue of $1,305 million?", "$1,305 million") is None
    )  # gives it away
    assert parse_question("The revenue was large.", "2019") is None  # no question


def test_generated_questions_are_cached_per_identity(domain, tiny_backbone):
    cache = SyntheticCache(domain.store)
    examples = [QA[0]]
    passages = PASSAGES
    identity = cache.identity(passages, examples, tiny_backbone.fingerprint, GenerationConfig(max_passages=3))
    assert cache.find(domain.name, identity) is None
    cache.put(domain.name, identity, list(QA[:2]))
    assert cache.find(domain.name, identity) == list(QA[:2])
    other = cache.identity(passages, examples, tiny_backbone.fingerprint, GenerationConfig(max_passages=4))
    assert cache.find(domain.name, other) is None


class Recorder:
    """The run hooks a trainer calls, kept in memory."""

    def __init__(self):
        self.events, self.steps = [], []

    def tick(self):
        pass

    def event(self, kind, **payload):
        self.events.append((kind, payload))

    def step(self, step, latest):
        self.steps.append((step, latest))

    def upload_index(self, directory, build_id):
        return "unused"

    def checkpoint(self, step, directory, state):
        pass


def _gold_ranks(backbone, key, passages, examples) -> list[int]:
    with torch.inference_mode():
        p = backbone.encode_passages(passages, key).numpy()
        q = backbone.encode_questions([e.question for e in examples], key).numpy()
    order = np.argsort(-(q @ p.T), axis=1)  # [questions, passages]
    ids = [p.id for p in passages]
    return [
        1 + min(list(order[i]).index(ids.index(g)) for g in e.passage_ids) for i, e in enumerate(examples)
    ]


def test_the_contrastive_retriever_phase_moves_gold_passages_up(domain, tiny_config, tiny_backbone, tmp_path):
    versions = IndexVersions(DomainRegistry(domain.store), tmp_path / "cache")
    index = versions.open_live(domain.name, embedding_dim=tiny_backbone.embedding_dim)
    passages = list(index.passages)
    examples = [e for e in QA if e.split == "train"]
    request = RunRequest.model_validate(
        {
            "domain": domain.name,
            "mode": "retriever_only",
            "hyperparameters": {
                "retriever_steps": 40,
                "retriever_batch_size": 8,
                "retriever_lr": 5e-3,
                "hard_negatives": 1,
                "seed": 1,
                "checkpoint_every": 1000,
            },
        }
    )
    key = "contrastive-test"
    torch.manual_seed(1)
    tiny_backbone.add_adapter_set(key, AdapterSetConfig())
    try:
        before = _gold_ranks(tiny_backbone, key, passages, examples)
        hooks = Recorder()
        trainer = Trainer(
            tiny_backbone,
            key,
            request,
            40,
            examples,
            [],
            index,
            None,
            hooks,
            refresher=None,
            work_dir=tmp_path / "train",
            state=TrainerState(),
            pairs=qa_pairs(examples, passages),
        )
        trainer._checkpoint = lambda optimizer, scheduler: None
        trainer.train()
        after = _gold_ranks(tiny_backbone, key, passages, examples)
    finally:
        tiny_backbone.remove_adapter_set(key)
    losses = [latest["contrastive"] for _, latest in hooks.steps]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
    assert sum(1 / r for r in after) > sum(1 / r for r in before) + 0.5, (before, after)
    assert all(a <= 2 for a in after), after  # every gold passage in the top 2 of 20


def test_a_run_on_synthetic_data_alone_succeeds(domain, tiny_config, tiny_backbone, tmp_path):
    """A domain without QA pairs: inverse-cloze pairs train the retriever; generated questions are asked for,
    cached in the store, and (the tiny generator writes none that survive the round trip) the run skips the
    joint phase rather than failing."""
    workspace = Workspace(tiny_config, tmp_path / "work", {"none": tiny_backbone})
    request = RunRequest.model_validate(
        {
            "domain": domain.name,
            "promote": "never",
            "evaluation": None,
            "train": {
                "synthetic": {"ict": {"min_words": 3}, "generated": {"max_passages": 6, "max_new_tokens": 12}}
            },
            "hyperparameters": {
                "retriever_steps": 4,
                "retriever_batch_size": 8,
                "steps": 3,
                "batch_size": 2,
                "top_k": 2,
                "seed": 2,
                "index_refresh_every": 1000,
            },
        }
    )
    info = adapt(domain.store, tiny_config, request, tmp_path / "work", progress=False, workspace=workspace)
    assert info.state == RunState.SUCCEEDED, info.error
    events, _ = RunStore(domain.store).events(info.id)
    data = next(e for e in events if e["kind"] == "data")
    assert data["examples"] == 0 and data["pairs"]["ict"] == 20  # one per passage of the toy domain
    generated = next(e for e in events if e["kind"] == "generated")
    assert generated["passages"] == 6 and data["generated"] == generated["kept"]
    assert artifacts.list_versions(
        domain.store, SyntheticCache.prefix(domain.name)
    )  # cached for the next run
    steps = [e["step"] for e in events if e["kind"] == "step"]
    assert steps[:4] == [1, 2, 3, 4]
    # The tiny generator's questions never survive the round trip: the joint phase is skipped, not failed.
    assert generated["kept"] == 0
    assert info.total_steps == 4 and steps == [1, 2, 3, 4]
    assert [e.get("skipped") for e in events if e["kind"] == "phase"] == [
        "no QA examples: none given, none generated"
    ]
    target = tmp_path / "fetched"
    adapters = AdapterRegistry(domain.store)
    adapters.fetch(
        adapters.ref(domain.name, info.adapter_version),
        target,
        expected_fingerprint=tiny_backbone.fingerprint,
    )
    for component in ("question", "passage"):
        weights = load_file(target / component / "adapter_model.safetensors")
        assert any(t.abs().sum() > 0 for n, t in weights.items() if "lora_B" in n), component
    # The new passage encoder's index was built and published with the version.
    assert info.index_version != DomainRegistry(domain.store).live(domain.name).index_version

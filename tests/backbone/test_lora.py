"""LoRA wiring on tiny random models: where adapters attach, what trains, and per-row adapter batches."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from backbone import (
    AdapterLoadError,
    AdapterSetConfig,
    Backbone,
    LoraConfig,
    ModelLoadError,
    Passage,
    UnknownAdapter,
)
from backbone.config import BackboneConfig
from tests.models import tiny_backbone_config

PASSAGES = [
    Passage("p1", "France", "the capital of france is paris"),
    Passage("p2", "Covid", "covid spreads through droplets and the incubation period is five days"),
    Passage("p3", "Finance", "the company revenue was 42 million dollars in 2019"),
]

VARIANTS = [("llama", "bert"), ("bart", "dpr")]


def load(tiny_root, generator, encoder) -> Backbone:
    return Backbone.load(tiny_backbone_config(tiny_root, generator=generator, encoder=encoder))


def with_adapters(tiny_root, seed: int, generator: str = "llama", encoder: str = "bert") -> Backbone:
    """A tiny backbone with two randomized adapter sets, "news" and "covid" (seeds `seed` and `seed` + 1)."""
    bb = load(tiny_root, generator, encoder)
    for offset, key in enumerate(["news", "covid"]):
        bb.add_adapter_set(key)
        randomize(bb, key, seed=seed + offset)
    return bb


@contextmanager
def ends_at_budget(generator) -> Iterator[None]:
    """Within: rows end at their token budgets, whatever the model says (no end tokens)."""
    saved, generator.eos_ids = generator.eos_ids, []
    try:
        yield
    finally:
        generator.eos_ids = saved


def randomize(backbone: Backbone, key: str, seed: int) -> None:
    """Give an adapter set non-zero B matrices so it changes outputs (fresh LoRA starts as the identity)."""
    generator = torch.Generator().manual_seed(seed)
    for params in backbone.trainable_parameters(key).values():
        for p in params:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)


@pytest.mark.parametrize("generator,encoder", VARIANTS)
def test_lora_attaches_to_qkv_only(tiny_root, generator, encoder):
    bb = load(tiny_root, generator, encoder)
    bb.add_adapter_set("news")
    for host in (bb.question.host, bb.passage.host, bb.generator.host):
        wrapped = {
            name.split(".")[-1] for name, module in host.peft.named_modules() if hasattr(module, "lora_A")
        }
        assert wrapped and wrapped <= {"query", "key", "value", "q_proj", "k_proj", "v_proj"}
        kinds = {name.rsplit(".", 1)[-1] for name in wrapped}
        assert kinds == (
            {"query", "key", "value"}
            if host.model_type in ("bert", "dpr")
            else {"q_proj", "k_proj", "v_proj"}
        )


def test_shared_encoder_weights_are_held_once(tiny_root):
    shared = load(tiny_root, "llama", "bert")
    assert shared.shared_encoder and shared.question.host is shared.passage.host
    separate = load(tiny_root, "bart", "dpr")
    assert not separate.shared_encoder


def test_custom_targets_and_rank(tiny_root):
    bb = load(tiny_root, "llama", "bert")
    config = AdapterSetConfig(
        question=LoraConfig(r=2, targets=("query",)),
        passage=LoraConfig(r=4),
        generator=LoraConfig(r=3, targets=("q_proj", "v_proj")),
    )
    bb.add_adapter_set("x", config)
    params = bb.trainable_parameters("x")
    assert {p.shape[0] for p in params["question"] if p.dim() == 2 and p.shape[1] == 32} >= {2}
    generator_modules = {n for n, m in bb.generator.host.peft.named_modules() if hasattr(m, "lora_A")}
    assert {n.rsplit(".", 1)[-1] for n in generator_modules} == {"q_proj", "v_proj"}


@pytest.mark.parametrize("generator,encoder", VARIANTS)
def test_training_step_leaves_frozen_base_unchanged(tiny_root, generator, encoder):
    bb = load(tiny_root, generator, encoder)
    bb.add_adapter_set("news")
    base_before = {
        name: tensor.clone()
        for host in (bb.question.host, bb.passage.host, bb.generator.host)
        for name, tensor in host.base.state_dict().items()
        if "lora_" not in name
    }
    with bb.training("news") as params:
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        loss = bb.rag_loss(["what is the capital of france"], ["paris"], [PASSAGES[:2]], "news")
        loss.backward()
        optimizer.step()
    base_after = {
        name: tensor
        for host in (bb.question.host, bb.passage.host, bb.generator.host)
        for name, tensor in host.base.state_dict().items()
        if "lora_" not in name
    }
    assert base_before.keys() == base_after.keys()
    assert all(torch.equal(base_before[n], base_after[n]) for n in base_before)
    assert all(
        not p.requires_grad
        for h in (bb.question.host, bb.generator.host)
        for n, p in h.peft.named_parameters()
    )


@pytest.mark.parametrize("generator,encoder", VARIANTS)
def test_gradients_reach_every_component_lora(tiny_root, generator, encoder):
    bb = load(tiny_root, generator, encoder)
    bb.add_adapter_set("news")
    randomize(bb, "news", seed=1)  # B=0 at init would zero the A gradients
    with bb.training("news"):
        bb.rag_loss(["what is the capital of france"], ["paris"], [PASSAGES[:2]], "news").backward()
    for component, params in bb.trainable_parameters("news").items():
        assert params, component
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params), component
    frozen = [
        p
        for h in (bb.question.host, bb.generator.host)
        for n, p in h.peft.named_parameters()
        if "lora_" not in n
    ]
    assert all(p.grad is None for p in frozen)


def test_generator_only_training_keeps_retriever_adapters_still(tiny_root):
    bb = load(tiny_root, "llama", "bert")
    bb.add_adapter_set("news")
    randomize(bb, "news", seed=2)
    with bb.training("news", components=("generator",)):
        bb.rag_loss(["what is the capital of france"], ["paris"], [PASSAGES[:2]], "news").backward()
    params = bb.trainable_parameters("news")
    assert all(p.grad is None for p in params["question"] + params["passage"])
    assert all(p.grad is not None for p in params["generator"])


@pytest.mark.parametrize("generator,encoder", VARIANTS)
def test_mixed_adapter_batch_equals_per_adapter_runs(tiny_root, generator, encoder):
    bb = with_adapters(tiny_root, 10, generator, encoder)
    rows = [None, "news", "covid", "news"]
    questions = [
        "what is the capital of france",
        "how does covid spread",
        "what was the revenue",
        "who said it",
    ]
    passages = [PASSAGES[0], PASSAGES[1], PASSAGES[2], PASSAGES[0]]
    with torch.inference_mode():
        mixed_q = bb.encode_questions(questions, rows)
        mixed_p = bb.encode_passages(passages, rows)
        sources = [bb.generator.source(q, p) for q, p in zip(questions, passages)]
        names = bb._names("generator", rows)
        mixed_g, _ = bb.generator.target_logprobs(sources, ["paris"] * 4, names)
        for i, key in enumerate(rows):
            single_q = bb.encode_questions([questions[i]], key)
            single_p = bb.encode_passages([passages[i]], key)
            single_g, _ = bb.generator.target_logprobs([sources[i]], ["paris"], [names[i]])
            torch.testing.assert_close(mixed_q[i : i + 1], single_q, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(mixed_p[i : i + 1], single_p, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(
                mixed_g[i : i + 1, -single_g.shape[1] :], single_g, atol=1e-4, rtol=1e-4
            )
    # the adapters really differ from the base and from each other
    assert not torch.allclose(mixed_q[1], bb.encode_questions([questions[1]], None)[0])
    assert not torch.allclose(
        bb.encode_questions([questions[0]], "news"), bb.encode_questions([questions[0]], "covid")
    )


@pytest.mark.parametrize("generator,encoder", VARIANTS)
def test_batched_inference_deltas_equal_peft_per_row_adapters(tiny_root, generator, encoder):
    """The inference path (every row's LoRA delta from a few wide matmuls) against PEFT's own per-row path
    (taken with gradients on): adapters of different ranks, alphas and targets, and base rows, in one batch,
    before and after an adapter's weights change."""
    bb = load(tiny_root, generator, encoder)
    configs = {
        "r8": AdapterSetConfig(),
        "r2": AdapterSetConfig(
            question=LoraConfig(r=2, alpha=4), passage=LoraConfig(r=2), generator=LoraConfig(r=2, alpha=3)
        ),
        "q_only": AdapterSetConfig(
            question=LoraConfig(r=4, targets=("query",) if encoder == "bert" else None)
        ),
    }
    for seed, (key, config) in enumerate(configs.items()):
        bb.add_adapter_set(key, config)
        randomize(bb, key, seed=40 + seed)
    rows = ["r8", None, "r2", "q_only", "r8", "r2"]
    questions = [f"question number {i} about {w}" for i, w in enumerate("abcdef")]
    sources = [bb.generator.source(q, PASSAGES[i % 3]) for i, q in enumerate(questions)]
    names = bb._names("generator", rows)

    def outputs():
        return (
            bb.encode_questions(questions, rows),
            bb.encode_passages([PASSAGES[i % 3] for i in range(6)], rows),
            bb.generator.target_logprobs(sources, ["paris"] * 6, names)[0],
        )

    for _ in range(2):  # as attached, then after new weights
        with torch.no_grad():
            batched = outputs()
        with torch.enable_grad():
            per_row = outputs()
        for ours, peft in zip(batched, per_row):
            torch.testing.assert_close(ours, peft.detach(), atol=1e-5, rtol=1e-4)
        with bb.training("r2"):  # new weights: the stacks built from the old ones must not serve
            randomize(bb, "r2", seed=50)


def test_mixed_batch_generation_matches_single_runs(tiny_root):
    bb = with_adapters(tiny_root, 20)
    questions = ["what is the capital", "how does covid spread", "what is the capital"]
    rows = ["news", "covid", None]
    passages = [PASSAGES[:2]] * 3
    scores = [[0.5, 0.1]] * 3
    mixed = bb.answer(questions, passages, scores, rows, max_new_tokens=6)
    single = [
        bb.answer([q], [p], [s], [r], max_new_tokens=6)[0]
        for q, p, s, r in zip(questions, passages, scores, rows)
    ]
    assert [a.text for a in mixed] == [a.text for a in single]
    assert len({a.text for a in mixed}) > 1  # different adapters, different answers


def test_adapter_set_round_trip_through_files(tiny_root, tmp_path):
    bb = load(tiny_root, "llama", "bert")
    bb.add_adapter_set("news")
    randomize(bb, "news", seed=3)
    bb.save_adapter_set("news", tmp_path / "news")
    assert sorted(p.name for p in (tmp_path / "news").iterdir()) == ["generator", "passage", "question"]
    bb.load_adapter_set("copy", tmp_path / "news")
    with torch.inference_mode():
        torch.testing.assert_close(bb.encode_passages(PASSAGES, "news"), bb.encode_passages(PASSAGES, "copy"))
        torch.testing.assert_close(bb.encode_questions(["a b"], "news"), bb.encode_questions(["a b"], "copy"))
    bb.remove_adapter_set("news")
    bb.remove_adapter_set("copy")
    assert bb.adapter_sets == []
    with pytest.raises(UnknownAdapter):
        bb.encode_questions(["x"], "news")


def test_hub_ids_are_refused_offline(tiny_root):
    config = tiny_backbone_config(tiny_root)
    with pytest.raises(ModelLoadError, match="hub access is off"):
        Backbone.load(
            BackboneConfig(**{**config.__dict__, "generator": "HuggingFaceTB/SmolLM2-135M-Instruct"})
        )


def test_reused_slots_serve_each_adapter_exactly(tiny_root):
    """Attaching into a slot freed by another adapter (or reserved up front) must equal a fresh attach,
    including a different LoRA alpha, and a different rank must get a slot of its own."""
    bb = load(tiny_root, "llama", "bert")
    bb.add_adapter_set(
        "a",
        AdapterSetConfig(
            question=LoraConfig(alpha=4), passage=LoraConfig(alpha=4), generator=LoraConfig(alpha=4)
        ),
    )
    bb.add_adapter_set("b")  # default alpha 16
    bb.add_adapter_set(
        "c", AdapterSetConfig(question=LoraConfig(r=2), passage=LoraConfig(r=2), generator=LoraConfig(r=2))
    )
    for seed, key in enumerate("abc"):
        randomize(bb, key, seed=30 + seed)
    weights = {key: bb.adapter_set_weights(key) for key in "abc"}
    with torch.inference_mode():
        expected = {key: bb.encode_passages(PASSAGES, key) for key in "abc"}
    bb.reserve_adapter_slots(1)
    for key in "abc":
        bb.remove_adapter_set(key)
    for key in "bca":  # every set lands in a slot another one used before
        bb.attach_adapter_set(f"{key}2", weights[key])
    with torch.inference_mode():
        for key in "abc":
            torch.testing.assert_close(bb.encode_passages(PASSAGES, f"{key}2"), expected[key])


def test_adapter_that_does_not_fit_attaches_nothing(tiny_root):
    bb = load(tiny_root, "llama", "bert")
    bb.add_adapter_set("a")
    weights = bb.adapter_set_weights("a")
    broken_state = dict(weights.states["generator"])
    broken_state.pop(next(iter(broken_state)))
    broken = type(weights)(configs=weights.configs, states={**weights.states, "generator": broken_state})
    with pytest.raises(AdapterLoadError, match="1 missing"):
        bb.attach_adapter_set("broken", broken)
    assert bb.adapter_sets == ["a"]
    with pytest.raises(UnknownAdapter):
        bb.encode_questions(["x"], "broken")

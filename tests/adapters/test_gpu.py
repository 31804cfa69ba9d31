"""On CUDA: training steps under bf16 autocast, and QLoRA (a 4-bit NF4 frozen generator). Skipped without
CUDA."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from adapters.training import autocast
from backbone import Backbone, Passage
from backbone.quantization import quantize_generator_4bit

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PASSAGES = [
    Passage("p1", "France", "the capital of france is paris"),
    Passage("p2", "Italy", "the capital of italy is rome"),
]


@pytest.mark.parametrize("quantize", ["none", "4bit"])
def test_a_rag_end2end_step_trains_every_component_on_the_gpu(tiny_config, quantize):
    if quantize == "4bit":
        bnb = pytest.importorskip("bitsandbytes")
    backbone = Backbone.load(replace(tiny_config, device="cuda"))
    if quantize == "4bit":
        quantize_generator_4bit(backbone)
        linear = [m for n, m in backbone.generator.host.base.named_modules() if n.endswith("q_proj")]
        assert linear and all(isinstance(m, bnb.nn.Linear4bit) for m in linear)
    backbone.add_adapter_set("gpu")
    with backbone.training("gpu") as params:
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        losses = []
        for _ in range(5):
            with autocast(backbone):
                queries = backbone.encode_questions(["what is the capital of france"] * 2, "gpu")
                loss = backbone.rag_loss(
                    ["what is the capital of france", None],
                    ["paris", "the capital of italy"],
                    [PASSAGES, PASSAGES],
                    "gpu",
                    question_embeddings=queries,
                )
            loss.backward()
            grads = {c: [p.grad for p in ps] for c, ps in backbone.trainable_parameters("gpu").items()}
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    assert all(g is not None and g.is_cuda for c in grads.values() for g in c)
    assert losses[-1] < losses[0]

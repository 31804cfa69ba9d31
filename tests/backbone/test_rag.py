"""RAG marginal losses: their algebra, and that End2End training lowers them on a toy task."""

from __future__ import annotations

import math

import pytest
import torch

from backbone import Backbone, Passage
from backbone.rag import fast_rag_sequence, normalize_answer, rag_sequence_nll, rag_token_nll
from tests.models import tiny_backbone_config

PASSAGES = [
    Passage("p1", "France", "the capital of france is paris"),
    Passage("p2", "Italy", "the capital of italy is rome"),
]


def test_sequence_and_token_losses_agree_on_single_token_answers():
    doc = torch.log_softmax(torch.randn(3, 4), -1)
    tokens = torch.log_softmax(torch.randn(3, 4, 7), -1)[..., :1]  # [n, k, T=1]
    mask = torch.ones(3, 1, dtype=torch.bool)
    torch.testing.assert_close(rag_sequence_nll(doc, tokens), rag_token_nll(doc, tokens, mask))


def test_sequence_loss_is_the_marginal_likelihood():
    doc = torch.log(torch.tensor([[0.75, 0.25]]))
    tokens = torch.log(torch.tensor([[[0.5, 0.5], [0.1, 1.0]]]))  # p(y|d1)=0.25, p(y|d2)=0.1
    assert rag_sequence_nll(doc, tokens).item() == pytest.approx(
        -math.log(0.75 * 0.25 + 0.25 * 0.1), rel=1e-5
    )


def test_fast_decoding_pools_equal_answers():
    texts = ["Paris", "paris.", "Rome"]
    candidates = fast_rag_sequence(texts, [-1.0, -1.0, -1.0], [math.log(0.3), math.log(0.3), math.log(0.4)])
    assert normalize_answer(candidates[0].text) == "paris"
    assert candidates[0].supporting == (0, 1)
    assert candidates[0].logprob == pytest.approx(math.log(0.6 * math.exp(-1.0)), rel=1e-5)
    assert normalize_answer(candidates[1].text) == "rome"  # alone, 0.4 of the mass beats neither 0.3 + 0.3


@pytest.mark.parametrize("kind", ["sequence", "token"])
@pytest.mark.parametrize("generator", ["llama", "bart"])
def test_end2end_training_lowers_rag_loss(tiny_root, kind, generator):
    torch.manual_seed(0)
    bb = Backbone.load(tiny_backbone_config(tiny_root, generator=generator))
    bb.add_adapter_set("toy")
    questions = ["what is the capital of france", "what is the capital of italy"]
    answers = ["paris", "rome"]
    passages = [PASSAGES, PASSAGES]
    with bb.training("toy") as params:
        optimizer = torch.optim.AdamW(params, lr=2e-2)
        losses = []
        for _ in range(30):
            loss = bb.rag_loss(questions, answers, passages, "toy", kind=kind)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    # Mean of the last steps: single steps are noisy (LoRA dropout, and sums that differ with the thread
    # count).
    assert sum(losses[-5:]) / 5 < 0.65 * losses[0]


def test_reconstruction_examples_train_without_a_question(tiny_root):
    bb = Backbone.load(tiny_backbone_config(tiny_root))
    bb.add_adapter_set("toy")
    anchor = bb.encode_passages([PASSAGES[0]], None).detach()  # stands in for the control-token query
    with bb.training("toy"):
        loss = bb.rag_loss(
            [None], ["the capital of france is paris"], [PASSAGES], "toy", question_embeddings=anchor
        )
        loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in bb.trainable_parameters("toy")["generator"])

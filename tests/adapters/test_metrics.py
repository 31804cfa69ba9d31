"""EM, F1 and recall@k as SQuAD and DPR define them, and the if_better comparison."""

from __future__ import annotations

import pytest

from adapters.evaluation import exact_match, f1_score, is_better, recall_at_k


@pytest.mark.parametrize(
    ("prediction", "answers", "em", "f1"),
    [
        # SQuAD v1.1 dev, "Super Bowl 50": articles and case vanish in normalisation.
        ("the Denver Broncos", ["Denver Broncos", "Denver Broncos", "Denver Broncos"], 1.0, 1.0),
        ("Denver Broncos won", ["Denver Broncos"], 0.0, 0.8),  # P 2/3, R 1
        ("Santa Clara, California", ["Santa Clara, California", "Levi's Stadium"], 1.0, 1.0),
        ("Levi's Stadium in the San Francisco Bay Area", ["Levi's Stadium"], 0.0, 2 * (2 / 7) / (2 / 7 + 1)),
        ("Saint Bernadette Soubirous", ["Saint Bernadette Soubirous"], 1.0, 1.0),
        ("Bernadette", ["Saint Bernadette Soubirous"], 0.0, 0.5),  # P 1, R 1/3
        ("gold", ["golden"], 0.0, 0.0),
        ("", ["Denver Broncos"], 0.0, 0.0),
        ("  The   Broncos.", ["broncos"], 1.0, 1.0),
    ],
)
def test_squad_exact_match_and_f1(prediction, answers, em, f1):
    assert exact_match(prediction, answers) == em
    assert f1_score(prediction, answers) == pytest.approx(f1)


def test_f1_takes_the_best_gold_answer_and_counts_repeated_tokens_once_each():
    assert f1_score("Broncos Broncos", ["Denver Broncos", "Broncos"]) == pytest.approx(2 * 0.5 * 1 / 1.5)


def test_recall_counts_a_question_when_any_gold_passage_is_in_the_top_k():
    retrieved = [["a", "b", "c"], ["d", "e", "f"], ["g", "h", "i"]]
    gold = [["c"], ["x", "e"], ["z"]]
    assert recall_at_k(retrieved, gold, 1) == 0.0
    assert recall_at_k(retrieved, gold, 2) == pytest.approx(1 / 3)
    assert recall_at_k(retrieved, gold, 3) == pytest.approx(2 / 3)
    assert recall_at_k(retrieved, [[], [], []], 3) is None  # no gold ids: recall is undefined, not zero
    assert recall_at_k(retrieved, [["c"], [], []], 3) == 1.0  # only questions with gold ids count


def _report(f1: float, recall5: float) -> dict:
    return {
        "questions": 10,
        "exact_match": 0.0,
        "f1": f1,
        "recall": {"1": 0.0, "5": recall5, "20": 1.0},
        "retrieval_questions": 10,
        "top_k": 5,
        "index_version": None,
        "adapter_version": None,
        "seconds": 1.0,
    }


def test_if_better_compares_f1_then_recall():
    assert is_better(_report(0.5, 0.1), _report(0.4, 0.9))
    assert not is_better(_report(0.4, 0.9), _report(0.5, 0.1))
    assert is_better(_report(0.5, 0.6), _report(0.5, 0.5))
    assert not is_better(_report(0.5, 0.5), _report(0.5, 0.5))  # a tie is not better: keep what serves
    assert is_better(_report(0.0, 0.0), None)

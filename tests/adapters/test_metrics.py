"""EM, F1 and recall@k as SQuAD and DPR define them, their bootstrap intervals, and the if_better rule."""

from __future__ import annotations

import random

import pytest

from adapters.evaluation import (
    EvalReport,
    bootstrap_ci,
    compare,
    exact_match,
    f1_score,
    is_better,
    recall_at_k,
)


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


def _report(f1: list[float], ranks: list[int | None]) -> dict:
    """A report over len(ranks) judged and len(f1) answered questions with these outcomes."""
    return EvalReport(
        questions=len(f1),
        exact_match=0.0,
        f1=sum(f1) / len(f1),
        recall={"dense": {"5": sum(r is not None and r <= 5 for r in ranks) / len(ranks)}},
        retrieval_questions=len(ranks),
        top_k=5,
        answer_retrieval="dense",
        index_version=None,
        adapter_version=None,
        seconds=1.0,
        per_question={
            "ids": [f"q{i}" for i in range(len(ranks))],
            "ranks": {"dense": ranks},
            "answered": [f"q{i}" for i in range(len(f1))],
            "em": [0.0] * len(f1),
            "f1": f1,
        },
    ).to_dict()


def test_the_bootstrap_interval_holds_the_mean_and_is_the_same_every_time():
    values = [1.0] * 30 + [0.0] * 70
    low, high = bootstrap_ci(values)
    assert low < 0.3 < high
    assert low > 0.15 and high < 0.45  # about +-0.09 for 100 Bernoulli outcomes at p=0.3
    assert bootstrap_ci(values) == (low, high)
    assert bootstrap_ci([]) is None


def test_the_difference_of_identical_systems_has_an_interval_holding_zero():
    rng = random.Random(0)
    f1 = [rng.random() for _ in range(200)]
    ranks = [rng.choice([1, 3, 7, None]) for _ in range(200)]
    same = _report(f1, ranks)
    for name, difference in compare(same, same).items():
        assert difference.value == 0.0, name
        assert difference.ci[0] <= 0.0 <= difference.ci[1], name
        assert not difference.significant


def test_if_better_refuses_a_gain_inside_the_noise_and_takes_a_real_one():
    rng = random.Random(1)
    old_f1 = [rng.random() for _ in range(150)]
    ranks = [rng.choice([1, 8]) for _ in range(150)]
    old = _report(old_f1, ranks)
    # +0.01 on average, but one question up by 1.5 and the rest spread around it: noise
    noisy = [min(max(v + rng.uniform(-0.3, 0.32), 0.0), 1.0) for v in old_f1]
    better, why = is_better(_report(noisy, ranks), old, "f1")
    assert not better, why
    # +0.1 on nearly every question: a gain whose whole interval lies above zero
    real = [min(v + 0.1, 1.0) for v in old_f1]
    better, why = is_better(_report(real, ranks), old, "f1")
    assert better, why
    assert "f1 +0.0" in why or "f1 +0.1" in why
    # recall@5 of the answering mode: two questions moved from rank 8 to 1 among 150 is noise
    moved = list(ranks)
    for i in [i for i, r in enumerate(ranks) if r == 8][:2]:
        moved[i] = 1
    assert not is_better(_report(old_f1, moved), old, "recall@5")[0]
    all_found = [1] * 150
    assert is_better(_report(old_f1, all_found), old, "recall@5")[0]
    assert is_better(_report(old_f1, ranks), None)[0]


def test_reports_are_paired_by_question_id():
    old = _report([0.0, 1.0, 0.0], [1, None, 1])
    new = EvalReport.from_dict(_report([1.0, 0.0], [None, 1, 1]))
    difference = compare(new, old, ["f1", "dense_recall@1"])
    assert difference["f1"].questions == 2 and difference["f1"].value == 0.0  # q0 0->1, q1 1->0
    assert difference["dense_recall@1"].value == pytest.approx(0.0)  # q0 lost, q1 gained, q2 kept
    with pytest.raises(ValueError):
        new.metric("sparse_recall@5")
    assert new.metric("recall@5") == new.metric("dense_recall@5") == 2 / 3

"""Evaluating an adapter set on a domain's QA split, on its whole knowledge base, with confidence intervals.

Retrieval: recall@1/5/20 for dense, BM25 and hybrid retrieval (the three modes a domain can serve with): the
share of questions with at least one gold passage among the top k (questions without gold passage ids are left
out), the ODQA "top-k retrieval accuracy", since any gold passage carries the answer. Answers: Exact Match and
token F1 (SQuAD normalisation: lower case, no punctuation, no articles, single spaces; best over the gold
answers), generated from the top-k passages of the retrieval mode the domain serves with.

Every figure comes with a 95% bootstrap confidence interval over the questions, and `compare` gives the paired
bootstrap interval of a difference between two reports on the same questions: on a few hundred questions a
0.01 difference is noise, and `promote: if_better` only promotes a change whose interval lies above zero.
The per-question outcomes (rank of the first gold passage per mode, EM and F1 per answered question) travel
in the report so that any two reports can be compared later.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from adapters.qa import QaExample
from backbone import normalize_answer

if TYPE_CHECKING:
    from backbone import Backbone
    from indexing import IndexHandle

RECALL_DEPTHS = (1, 5, 20)
RETRIEVAL_MODES = ("dense", "bm25", "hybrid")
PrimaryMetric = Literal["recall@5", "f1"]
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 20231


def exact_match(prediction: str, answers: Iterable[str]) -> float:
    return max((float(normalize_answer(prediction) == normalize_answer(a)) for a in answers), default=0.0)


def _f1(prediction: str, answer: str) -> float:
    predicted, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    if not predicted or not gold:
        return float(predicted == gold)
    common = sum((Counter(predicted) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, answers: Iterable[str]) -> float:
    return max((_f1(prediction, a) for a in answers), default=0.0)


def recall_at_k(retrieved: Sequence[Sequence[str]], gold: Sequence[Sequence[str]], k: int) -> float | None:
    """Share of questions (with gold ids) whose top-k retrieved ids hold a gold id; None when none has
    gold."""
    judged = [(row[:k], set(ids)) for row, ids in zip(retrieved, gold) if ids]
    if not judged:
        return None
    return sum(1.0 for row, ids in judged if ids.intersection(row)) / len(judged)


def first_gold_rank(retrieved: Sequence[str], gold: Iterable[str]) -> int | None:
    """1-based rank of the first gold passage among `retrieved`, None when none is there."""
    gold = set(gold)
    return next((rank for rank, pid in enumerate(retrieved, start=1) if pid in gold), None)


# --- confidence intervals -----------------------------------------------------------------------------------


def bootstrap_ci(
    values: Sequence[float],
    *,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = 0.95,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of `values` (per-question outcomes); None for no values.

    Seeded, so the same outcomes always give the same interval."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return None
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(samples, data.size))].mean(axis=1)  # [samples]
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return round(float(low), 4), round(float(high), 4)


@dataclass(frozen=True)
class Difference:
    """new - old on the questions both reports scored, with the paired bootstrap interval."""

    value: float
    ci: tuple[float, float]
    questions: int

    @property
    def significant(self) -> bool:
        """The whole interval lies above zero: a gain that is not noise."""
        return self.ci[0] > 0

    def to_dict(self) -> dict:
        return {"value": self.value, "ci": list(self.ci), "questions": self.questions}


def paired_difference(new: Sequence[float], old: Sequence[float], **bootstrap) -> Difference | None:
    """The mean of new - old over paired outcomes (same questions, same order), with its interval."""
    if len(new) != len(old):
        raise ValueError(f"{len(new)} outcomes paired with {len(old)}")
    if not new:
        return None
    deltas = np.asarray(new, dtype=np.float64) - np.asarray(old, dtype=np.float64)
    return Difference(round(float(deltas.mean()), 4), bootstrap_ci(deltas, **bootstrap), len(deltas))


# --- reports ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalReport:
    """Scores of one adapter set (or the base backbone) over one index on one split.

    `recall[mode][k]` is recall@k of that retrieval mode ("1", "5", "20"), `recall_ci` its interval; EM and F1
    are over the `questions` answered, from the top `top_k` passages of `answer_retrieval`. `per_question`
    holds the outcomes behind every figure: `ids` (judged questions) with `ranks[mode]` (rank of the first
    gold passage, None beyond the deepest k), and `answered` ids with their `em` and `f1`.
    """

    questions: int
    exact_match: float | None
    f1: float | None
    recall: dict[str, dict[str, float | None]]
    retrieval_questions: int
    top_k: int
    answer_retrieval: str
    index_version: str | None
    adapter_version: str | None
    seconds: float
    exact_match_ci: tuple[float, float] | None = None
    f1_ci: tuple[float, float] | None = None
    recall_ci: dict[str, dict[str, tuple[float, float] | None]] = field(default_factory=dict)
    closed_book: bool = False
    per_question: dict = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)  # a few (question, prediction, answers) for people

    def recall_at(self, k: int, mode: str | None = None) -> float | None:
        return self.recall.get(mode or self.answer_retrieval, {}).get(str(k))

    def metric(self, name: str) -> float | None:
        """A figure by name: "f1", "exact_match", "recall@K" (the answering mode) or "<mode>_recall@K"."""
        if name in ("f1", "exact_match"):
            return getattr(self, name)
        mode, k = self._recall_name(name)
        return self.recall_at(k, mode)

    def outcomes(self, name: str) -> tuple[list[str], list[float]]:
        """(question ids, per-question outcome) behind the figure `name`."""
        pq = self.per_question
        if name in ("f1", "exact_match"):
            return list(pq.get("answered", [])), list(pq.get("em" if name == "exact_match" else "f1", []))
        mode, k = self._recall_name(name)
        ranks = pq.get("ranks", {}).get(mode or self.answer_retrieval)
        if ranks is None:
            return [], []
        return list(pq["ids"]), [float(r is not None and r <= k) for r in ranks]

    @staticmethod
    def _recall_name(name: str) -> tuple[str | None, int]:
        """("dense", 5) for "dense_recall@5"; (None, 5) for "recall@5" (the answering mode)."""
        prefix, found, k = name.rpartition("recall@")
        mode = prefix.removesuffix("_") or None
        if not found or not k.isdigit() or (mode is not None and mode not in RETRIEVAL_MODES):
            raise ValueError(f"unknown metric {name!r}: f1, exact_match, recall@K or <mode>_recall@K")
        return mode, int(k)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> dict:
        """The report without its per-question outcomes (what events and tables show)."""
        return {k: v for k, v in self.to_dict().items() if k != "per_question"}

    @classmethod
    def from_dict(cls, data: dict) -> EvalReport:
        return cls(**data)


def as_report(report: dict | EvalReport) -> EvalReport:
    return report if isinstance(report, EvalReport) else EvalReport.from_dict(report)


def compare(
    new: dict | EvalReport, old: dict | EvalReport, metrics: Iterable[str] | None = None
) -> dict[str, Difference | None]:
    """Paired differences new - old per metric, on the questions both scored (matched by question id)."""
    new, old = as_report(new), as_report(old)
    if metrics is None:
        modes = [m for m in RETRIEVAL_MODES if m in new.recall and m in old.recall]
        metrics = ["f1", "exact_match", *(f"{m}_recall@{k}" for m in modes for k in RECALL_DEPTHS)]
    differences = {}
    for name in metrics:
        new_ids, new_values = new.outcomes(name)
        old_by_id = dict(zip(*old.outcomes(name)))
        paired = [(v, old_by_id[i]) for i, v in zip(new_ids, new_values) if i in old_by_id]
        differences[name] = paired_difference([p[0] for p in paired], [p[1] for p in paired])
    return differences


def is_better(
    new: dict | EvalReport, old: dict | EvalReport | None, metric: PrimaryMetric = "f1"
) -> tuple[bool, str]:
    """`if_better` promotion: better only when the paired 95% interval of the gain on `metric` lies above
    zero. No old report: better. Returns (better, why)."""
    if old is None:
        return True, "nothing to compare with"
    difference = compare(new, old, [metric])[metric]
    if difference is None:
        return False, f"no paired questions to compare {metric} on"
    why = f"{metric} {difference.value:+.4f} (95% CI {difference.ci[0]:+.4f} .. {difference.ci[1]:+.4f})"
    return difference.significant, why


# --- evaluating ---------------------------------------------------------------------------------------------


def _question_id(example: QaExample, position: int) -> str:
    return example.id or f"#{position}"


def evaluate(
    backbone: Backbone,
    adapter: str | None,
    index: IndexHandle,
    examples: list[QaExample],
    *,
    top_k: int = 5,
    max_new_tokens: int = 32,
    max_questions: int | None = None,
    batch_size: int = 8,
    answer_retrieval: str | None = None,
    closed_book: bool = False,
    adapter_version: str | None = None,
    tick: Callable[[], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> EvalReport:
    """Retrieve with the question encoder of `adapter` (None: base) from `index` in every mode it supports,
    answer the first `max_questions` examples from the top-k passages of `answer_retrieval` (default: the
    index's configured mode) with its generator, and score; recall@k is over every example. `closed_book`
    answers from the question alone (a generator's own knowledge, no passages).

    `tick` runs between batches (a run's cancel check and lease renewal); `progress(done, total)` after
    each.
    """
    import torch

    started = time.perf_counter()
    answer_retrieval = answer_retrieval or index.config.retrieval
    if answer_retrieval not in index.modes:
        answer_retrieval = "dense"
    depth = min(max(max(RECALL_DEPTHS), top_k), index.size)
    answered = examples if max_questions is None else examples[:max_questions]
    total = len(examples) + len(answered)
    ids = [_question_id(e, i) for i, e in enumerate(examples)]
    ranked: dict[str, list[list]] = {mode: [] for mode in index.modes}
    for start in range(0, len(examples), 32):
        batch = examples[start : start + 32]
        texts = [e.question for e in batch]
        with torch.inference_mode():
            embeddings = backbone.encode_questions(texts, adapter)  # [n, dim]
        for mode in index.modes:
            ranked[mode] += index.search(embeddings, texts, k=depth, mode=mode)
        if tick:
            tick()
        if progress:
            progress(len(ranked["dense"]), total)

    judged = [i for i, e in enumerate(examples) if e.passage_ids]
    ranks = {
        mode: [first_gold_rank([h.passage.id for h in rows[i]], examples[i].passage_ids) for i in judged]
        for mode, rows in ranked.items()
    }
    recall: dict[str, dict[str, float | None]] = {}
    recall_ci: dict[str, dict[str, tuple[float, float] | None]] = {}
    for mode in RETRIEVAL_MODES:
        if mode not in ranks:
            continue
        hits = {k: [float(r is not None and r <= k) for r in ranks[mode]] for k in RECALL_DEPTHS}
        recall[mode] = {str(k): (round(float(np.mean(v)), 4) if v else None) for k, v in hits.items()}
        recall_ci[mode] = {str(k): bootstrap_ci(v) for k, v in hits.items()}

    ems: list[float] = []
    f1s: list[float] = []
    samples: list[dict] = []
    for start in range(0, len(answered), batch_size):
        batch = answered[start : start + batch_size]
        questions = [e.question for e in batch]
        if closed_book:
            answers = backbone.answer_closed_book(questions, adapter, max_new_tokens=max_new_tokens)
        else:
            rows = ranked[answer_retrieval][start : start + len(batch)]
            passages = [[h.passage for h in row[:top_k]] for row in rows]
            scores = [[h.score for h in row[:top_k]] for row in rows]
            answers = backbone.answer(questions, passages, scores, adapter, max_new_tokens=max_new_tokens)
        for example, answer in zip(batch, answers):
            ems.append(exact_match(answer.text, example.answers))
            f1s.append(round(f1_score(answer.text, example.answers), 4))
            if len(samples) < 5:
                samples.append(
                    {
                        "question": example.question,
                        "prediction": answer.text,
                        "answers": list(example.answers),
                    }
                )
        if tick:
            tick()
        if progress:
            progress(len(examples) + len(ems), total)
    return EvalReport(
        questions=len(ems),
        exact_match=round(float(np.mean(ems)), 4) if ems else None,
        f1=round(float(np.mean(f1s)), 4) if f1s else None,
        recall=recall,
        retrieval_questions=len(judged),
        top_k=top_k,
        answer_retrieval=answer_retrieval,
        index_version=index.version,
        adapter_version=adapter_version,
        seconds=round(time.perf_counter() - started, 3),
        exact_match_ci=bootstrap_ci(ems),
        f1_ci=bootstrap_ci(f1s),
        recall_ci=recall_ci,
        closed_book=closed_book,
        per_question={
            "ids": [ids[i] for i in judged],
            "ranks": ranks,
            "answered": ids[: len(answered)],
            "em": ems,
            "f1": f1s,
        },
        samples=samples,
    )


def format_table(rows: list[tuple[str, EvalReport]]) -> str:
    """One line per evaluated configuration: EM and F1 with their 95% intervals, recall@5 per retrieval mode
    and recall@1/20 of dense retrieval."""
    header = (
        f"{'mode':<16} {'adapter':<24} {'answered':>8} {'EM [95% CI]':>19} {'F1 [95% CI]':>19} "
        f"{'dense R@1':>9} {'R@5':>6} {'R@20':>6} {'bm25 R@5':>8} {'hybrid R@5':>10}"
    )
    lines = [header, "-" * len(header)]

    def fmt(value: float | None, width: int = 6) -> str:
        return f"{value:{width}.3f}" if value is not None else f"{'-':>{width}}"

    def with_ci(value: float | None, ci) -> str:
        text = f"{value:.3f} [{ci[0]:.2f},{ci[1]:.2f}]" if value is not None and ci else "-"
        return f"{text:>19}"

    for name, report in rows:
        lines.append(
            f"{name:<16} {report.adapter_version or 'base':<24} {report.questions:>8} "
            f"{with_ci(report.exact_match, report.exact_match_ci)} {with_ci(report.f1, report.f1_ci)} "
            f"{fmt(report.recall_at(1, 'dense'), 9)} {fmt(report.recall_at(5, 'dense'))} "
            f"{fmt(report.recall_at(20, 'dense'))} {fmt(report.recall_at(5, 'bm25'), 8)} "
            f"{fmt(report.recall_at(5, 'hybrid'), 10)}"
        )
    return "\n".join(lines)


def format_differences(base: EvalReport, rows: list[tuple[str, EvalReport]]) -> str:
    """One line per configuration: its difference to `base` on F1, EM and recall@5 per retrieval mode, each
    with the paired 95% interval; a * marks an interval that excludes zero."""
    names = ["f1", "exact_match", *(f"{m}_recall@5" for m in RETRIEVAL_MODES if m in base.recall)]
    header = f"{'mode':<16} " + " ".join(f"{name:>24}" for name in names)
    lines = [header, "-" * len(header)]
    for mode, report in rows:
        cells = []
        for _name, d in compare(report, base, names).items():
            if d is None:
                text = "-"
            else:
                mark = "*" if d.ci[0] > 0 or d.ci[1] < 0 else ""
                text = f"{d.value:+.3f} [{d.ci[0]:+.2f},{d.ci[1]:+.2f}]{mark}"
            cells.append(f"{text:>24}")
        lines.append(f"{mode:<16} " + " ".join(cells))
    return "\n".join(lines)

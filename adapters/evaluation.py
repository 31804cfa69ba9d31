"""Evaluating an adapter set on a domain's QA split: Exact Match, token F1 (SQuAD) and retrieval recall@k.

EM and F1 take the best match over a question's gold answers, after SQuAD normalisation (lower case, no
punctuation, no articles, single spaces). Recall@k is the share of questions with at least one gold passage
among the top k retrieved (questions without gold passage ids are left out of it): the ODQA "top-k
retrieval accuracy", since any gold passage carries the answer.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from backbone import normalize_answer

from adapters.qa import QaExample

if TYPE_CHECKING:
    from backbone import Backbone
    from indexing import IndexHandle

RECALL_DEPTHS = (1, 5, 20)


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


@dataclass(frozen=True)
class EvalReport:
    """Scores of one adapter set (or the base backbone) over one index on one split."""

    questions: int  # questions answered (EM/F1 are over these)
    exact_match: float
    f1: float
    recall: dict[str, float | None]  # "1", "5", "20" -> recall@k over every question with gold passages
    retrieval_questions: int
    top_k: int
    index_version: str | None
    adapter_version: str | None
    seconds: float
    samples: list[dict] = field(default_factory=list)  # a few (question, prediction, answers) for people

    def recall_at(self, k: int) -> float | None:
        return self.recall.get(str(k))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "EvalReport":
        return cls(**data)


def is_better(new: dict | EvalReport, old: dict | EvalReport | None, k: int = 5) -> bool:
    """`if_better` promotion: a higher F1 wins; equal F1 is decided by recall@k. No old report: better."""
    if old is None:
        return True
    new = new if isinstance(new, EvalReport) else EvalReport.from_dict(new)
    old = old if isinstance(old, EvalReport) else EvalReport.from_dict(old)
    if abs(new.f1 - old.f1) > 1e-9:
        return new.f1 > old.f1
    return (new.recall_at(k) or 0.0) > (old.recall_at(k) or 0.0)


def evaluate(
    backbone: "Backbone",
    adapter: str | None,
    index: "IndexHandle",
    examples: list[QaExample],
    *,
    top_k: int = 5,
    max_new_tokens: int = 32,
    max_questions: int | None = None,
    batch_size: int = 4,
    adapter_version: str | None = None,
    tick: Callable[[], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> EvalReport:
    """Retrieve with the question encoder of `adapter` (None: base) from `index`, answer the first
    `max_questions` examples from their top-k passages with its generator, and score; recall@k is over
    every example.

    `tick` runs between batches (a run's cancel check and lease renewal); `progress(done, total)` after
    each.
    """
    import torch

    started = time.perf_counter()
    depth = min(max(max(RECALL_DEPTHS), top_k), index.size)
    answered = examples if max_questions is None else examples[:max_questions]
    total = len(examples) + len(answered)
    retrieved: list[list[str]] = []
    hits_by_row = []
    for start in range(0, len(examples), 32):
        batch = examples[start : start + 32]
        with torch.inference_mode():
            embeddings = backbone.encode_questions([e.question for e in batch], adapter)  # [n, dim]
        hits = index.search(embeddings, k=depth, mode="dense")
        hits_by_row += hits
        retrieved += [[h.passage.id for h in row] for row in hits]
        if tick:
            tick()
        if progress:
            progress(len(retrieved), total)
    gold = [list(e.passage_ids) for e in examples]
    recall = {str(k): recall_at_k(retrieved, gold, k) for k in RECALL_DEPTHS}

    ems, f1s, samples = [], [], []
    for start in range(0, len(answered), batch_size):
        batch = answered[start : start + batch_size]
        rows = hits_by_row[start : start + len(batch)]
        passages = [[h.passage for h in row[:top_k]] for row in rows]
        scores = [[h.score for h in row[:top_k]] for row in rows]
        answers = backbone.answer(
            [e.question for e in batch], passages, scores, adapter, max_new_tokens=max_new_tokens
        )
        for example, answer in zip(batch, answers):
            ems.append(exact_match(answer.text, example.answers))
            f1s.append(f1_score(answer.text, example.answers))
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
    judged = sum(1 for ids in gold if ids)
    return EvalReport(
        questions=len(ems),
        exact_match=sum(ems) / len(ems) if ems else 0.0,
        f1=sum(f1s) / len(f1s) if f1s else 0.0,
        recall=recall,
        retrieval_questions=judged,
        top_k=top_k,
        index_version=index.version,
        adapter_version=adapter_version,
        seconds=round(time.perf_counter() - started, 3),
        samples=samples,
    )


def format_table(rows: list[tuple[str, EvalReport]]) -> str:
    """One line per evaluated configuration: EM, F1 and recall@1/5/20."""
    header = (
        f"{'mode':<16} {'adapter':<24} {'questions':>9} {'EM':>6} {'F1':>6} {'R@1':>6} {'R@5':>6} {'R@20':>6}"
    )
    lines = [header, "-" * len(header)]

    def fmt(value: float | None) -> str:
        return f"{value:6.3f}" if value is not None else f"{'-':>6}"

    for name, report in rows:
        lines.append(
            f"{name:<16} {report.adapter_version or 'base':<24} {report.questions:>9} "
            f"{fmt(report.exact_match)} {fmt(report.f1)} "
            f"{fmt(report.recall_at(1))} {fmt(report.recall_at(5))} {fmt(report.recall_at(20))}"
        )
    return "\n".join(lines)

"""RAG marginal likelihoods (Lewis et al.) over k retrieved passages, and RAG-sequence fast decoding."""

from __future__ import annotations

import re
import string
from collections import defaultdict
from dataclasses import dataclass

import torch


def rag_sequence_nll(doc_logprobs: torch.Tensor, token_logprobs: torch.Tensor) -> torch.Tensor:
    """-log sum_k p(doc_k|q) p(y|q,doc_k), averaged over questions.

    doc_logprobs [n, k]; token_logprobs [n, k, T] (zeros where masked).
    """
    seq = token_logprobs.sum(-1)  # [n, k]
    return -torch.logsumexp(doc_logprobs + seq, dim=-1).mean()


def rag_token_nll(doc_logprobs: torch.Tensor, token_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """-sum_t log sum_k p(doc_k|q) p(y_t|q,doc_k,y<t): the documents are marginalised per token.

    mask [n, T] marks real answer tokens (shared across the k passages of a question).
    """
    per_token = torch.logsumexp(doc_logprobs.unsqueeze(-1) + token_logprobs, dim=1)  # [n, T]
    return -(per_token * mask).sum(-1).mean()


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


@dataclass(frozen=True)
class Candidate:
    text: str
    logprob: float  # log of the marginal over the passages that produced it
    supporting: tuple[int, ...]  # indices into the question's k passages


def fast_rag_sequence(texts: list[str], seq_logprobs: list[float], doc_logprobs: list[float]) -> list[Candidate]:
    """RAG-sequence "fast decoding": each passage proposes its own answer; equal answers pool their mass
    sum_k p(doc_k|q) p(y|q,doc_k) over the passages that proposed them (the rest count as zero). Best first."""
    groups: dict[str, list[int]] = defaultdict(list)
    for index, text in enumerate(texts):
        groups[normalize_answer(text)].append(index)
    candidates = []
    for members in groups.values():
        scores = torch.tensor([doc_logprobs[i] + seq_logprobs[i] for i in members])
        best = max(members, key=lambda i: doc_logprobs[i] + seq_logprobs[i])
        candidates.append(Candidate(texts[best], float(torch.logsumexp(scores, 0)), tuple(members)))
    return sorted(candidates, key=lambda c: c.logprob, reverse=True)

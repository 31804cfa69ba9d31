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


def rag_token_nll(
    doc_logprobs: torch.Tensor, token_logprobs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """-sum_t log sum_k p(doc_k|q) p(y_t|q,doc_k,y<t): the documents are marginalised per token.

    mask [n, T] marks real answer tokens (shared across the k passages of a question).
    """
    per_token = torch.logsumexp(doc_logprobs.unsqueeze(-1) + token_logprobs, dim=1)  # [n, T]
    return -(per_token * mask).sum(-1).mean()


def info_nce(
    queries: torch.Tensor, passages: torch.Tensor, positives: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Supervised contrastive loss (DPR): -log of the softmax mass of each query's positive passages among all
    passages of the batch (its hard negatives and every other row's passages), averaged over queries.

    queries [n, dim], passages [m, dim], positives [n, m] bool (a query may have several, e.g. every passage
    holding its answer). Rows without a positive are left out."""
    scores = queries @ passages.T / temperature  # [n, m]
    keep = positives.any(-1)
    scores, positives = scores[keep], positives[keep]
    if scores.shape[0] == 0:
        return scores.sum()
    positive_mass = torch.logsumexp(scores.masked_fill(~positives, float("-inf")), dim=-1)
    return -(positive_mass - torch.logsumexp(scores, dim=-1)).mean()


def lm_supervised_kl(
    doc_logprobs: torch.Tensor, answer_logprobs: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """LM-supervised retrieval (REPLUG, RA-DIT's LSR): KL(p_retriever(d|q) || p_LM(d|q,y)) over the top k,
    where p_LM is the softmax of the generator's log-likelihood of the answer given each passage, detached.

    doc_logprobs [n, k] (log_softmax of the doc scores); answer_logprobs [n, k] (log p(y | q, d))."""
    target = torch.log_softmax(answer_logprobs.detach() / temperature, dim=-1)  # [n, k]
    return (doc_logprobs.exp() * (doc_logprobs - target)).sum(-1).mean()


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


def fast_rag_sequence(
    texts: list[str], seq_logprobs: list[float], doc_logprobs: list[float]
) -> list[Candidate]:
    """RAG-sequence "fast decoding": each passage proposes its own answer; equal answers pool their mass
    sum_k p(doc_k|q) p(y|q,doc_k) over the passages that proposed them (the rest count as zero). Best
    first."""
    groups: dict[str, list[int]] = defaultdict(list)
    for index, text in enumerate(texts):
        groups[normalize_answer(text)].append(index)
    candidates = []
    for members in groups.values():
        scores = torch.tensor([doc_logprobs[i] + seq_logprobs[i] for i in members])
        best = max(members, key=lambda i: doc_logprobs[i] + seq_logprobs[i])
        candidates.append(Candidate(texts[best], float(torch.logsumexp(scores, 0)), tuple(members)))
    return sorted(candidates, key=lambda c: c.logprob, reverse=True)

"""Fusing dense and BM25 rankings: reciprocal-rank fusion and weighted fusion of min-max normalised scores.

RRF (Cormack et al., 2009) needs only ranks, so the two score scales never meet; weighted fusion keeps score
gaps (a passage far ahead in one list stays ahead) at the price of a weight to choose. Both return candidates
best first, ties broken by passage index so equal inputs always give equal outputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def reciprocal_rank_fusion(
    rankings: Sequence[Sequence[int]], k: int = 60, weights: Sequence[float] | None = None
) -> list[tuple[int, float]]:
    """score(d) = sum over rankings of weight / (k + rank of d), ranks from 1; absent passages add nothing."""
    weights = weights if weights is not None else [1.0] * len(rankings)
    fused: dict[int, float] = {}
    for ranking, weight in zip(rankings, weights):
        for rank, index in enumerate(ranking, start=1):
            fused[int(index)] = fused.get(int(index), 0.0) + weight / (k + rank)
    return sorted(fused.items(), key=lambda item: (-item[1], item[0]))


def min_max(scores: np.ndarray) -> np.ndarray:
    """Scale to [0, 1]; a constant list maps to ones (every candidate equally good)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return scores
    low, high = scores.min(), scores.max()
    if high - low <= 1e-12:
        return np.ones_like(scores)
    return (scores - low) / (high - low)


def weighted_fusion(
    dense: tuple[Sequence[int], Sequence[float]],
    lexical: tuple[Sequence[int], Sequence[float]],
    dense_weight: float = 0.5,
) -> list[tuple[int, float]]:
    """score(d) = w * norm_dense(d) + (1 - w) * norm_bm25(d), each list min-max normalised on its own.

    A passage missing from one list gets 0 from it, the same as that list's weakest candidate.
    """
    if not 0.0 <= dense_weight <= 1.0:
        raise ValueError(f"dense_weight must be in [0, 1], got {dense_weight}")
    fused: dict[int, float] = {}
    for (indices, scores), weight in ((dense, dense_weight), (lexical, 1.0 - dense_weight)):
        for index, score in zip(indices, min_max(np.asarray(scores))):
            fused[int(index)] = fused.get(int(index), 0.0) + weight * float(score)
    return sorted(fused.items(), key=lambda item: (-item[1], item[0]))

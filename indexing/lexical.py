"""BM25 over passage titles and texts (bm25s), the lexical half of hybrid retrieval.

Tokenisation is ours (lower-cased word characters, English stop words dropped) and recorded with the index, so
queries are tokenised exactly as the passages were, whichever bm25s version reads the index back.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import bm25s
import numpy as np
from bm25s.stopwords import STOPWORDS_EN

from backbone import Passage

from .errors import IndexingError

_WORD = re.compile(r"\w+", re.UNICODE)
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_VERSION = 1


def tokenize(text: str, stopwords: frozenset[str]) -> list[str]:
    return [word for word in _WORD.findall(text.lower()) if word not in stopwords]


class Bm25Index:
    """A read-only BM25 index; `scores` may be called from many threads at once (it only reads arrays)."""

    def __init__(self, retriever: bm25s.BM25, stopwords: frozenset[str]):
        self._retriever = retriever
        self._stopwords = stopwords
        self._size = int(retriever.scores["num_docs"])

    @property
    def size(self) -> int:
        return self._size

    @classmethod
    def build(cls, passages: list[Passage], k1: float = 1.5, b: float = 0.75) -> Bm25Index:
        stopwords = frozenset(STOPWORDS_EN)
        corpus = [tokenize(f"{p.title} {p.text}", stopwords) for p in passages]
        retriever = bm25s.BM25(k1=k1, b=b, method="lucene")
        retriever.index(corpus, show_progress=False)
        return cls(retriever, stopwords)

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._retriever.save(str(directory), show_progress=False)
        settings = {
            "version": TOKENIZER_VERSION,
            "pattern": _WORD.pattern,
            "lowercase": True,
            "stopwords": sorted(self._stopwords),
        }
        (directory / TOKENIZER_FILE).write_text(json.dumps(settings))

    @classmethod
    def load(cls, directory: Path) -> Bm25Index:
        directory = Path(directory)
        settings = json.loads((directory / TOKENIZER_FILE).read_text())
        if settings.get("version") != TOKENIZER_VERSION or settings.get("pattern") != _WORD.pattern:
            raise IndexingError(f"BM25 index at {directory} uses another tokeniser ({settings}); rebuild it")
        retriever = bm25s.BM25.load(str(directory), show_progress=False)
        return cls(retriever, frozenset(settings["stopwords"]))

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every passage for one query: [size] float32, zeros when no query word is known."""
        ids = self._retriever.get_tokens_ids(tokenize(query, self._stopwords))
        if not ids:
            return np.zeros(self._size, dtype=np.float32)
        return np.asarray(self._retriever.get_scores_from_ids(ids), dtype=np.float32)

    def top_k(self, query: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices and scores of the best `k` passages sharing a word with the query, best first."""
        scores = self.scores(query)  # [size]
        return top_k(scores, k, positive_only=True)


def top_k(scores: np.ndarray, k: int, positive_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Best-first indices and scores of a score vector; ties go to the lower index, so results are stable."""
    candidates = np.flatnonzero(scores > 0) if positive_only else np.arange(len(scores))
    if len(candidates) > k:
        # The k-th largest value bounds the result; ties at that value are settled by index in the sort below.
        kth = np.partition(scores[candidates], len(candidates) - k)[len(candidates) - k]
        candidates = candidates[scores[candidates] >= kth]
    order = np.lexsort((candidates, -scores[candidates]))[:k]
    chosen = candidates[order]
    return chosen, scores[chosen]

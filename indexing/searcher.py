"""Searching one index version: dense (FAISS inner product), BM25, or the two fused.

An `IndexHandle` is immutable once opened and keyed by (domain, index_version); a rebuild opens a new handle
beside it instead of changing it, so a reader holding a handle always sees one complete version. CPU FAISS and
the BM25 arrays are only read during search, so any number of threads may search one handle at once; a GPU
index (not re-entrant) is searched under a lock.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import faiss
import numpy as np

from backbone import Passage

from .builder import (
    BM25_DIR,
    BUILD_FILE,
    INDEX_FILE,
    PASSAGES_FILE,
    BuildInfo,
    FusionMethod,
    IndexConfig,
    RetrievalMode,
    faiss_gpu_available,
)
from .chunking import read_passages
from .errors import DimensionMismatch, EncoderMismatch, IndexVersionNotFound, RetrievalModeUnavailable
from .fusion import reciprocal_rank_fusion, weighted_fusion
from .lexical import Bm25Index

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hit:
    passage: Passage
    score: float  # dense: inner product; bm25: BM25 score; hybrid: the fused score


class IndexHandle:
    """One opened index version. Build it with `IndexHandle.open`; it never changes afterwards."""

    __slots__ = (
        "_bm25",
        "_config",
        "_directory",
        "_domain",
        "_gpu_lock",
        "_index",
        "_info",
        "_passages",
        "_version",
    )

    def __init__(
        self,
        *,
        domain: str,
        version: str,
        directory: Path,
        info: BuildInfo,
        config: IndexConfig,
        passages: tuple[Passage, ...],
        index: faiss.Index,
        bm25: Bm25Index | None,
        gpu_lock: threading.Lock | None,
    ):
        self._domain = domain
        self._version = version
        self._directory = directory
        self._info = info
        self._config = config
        self._passages = passages
        self._index = index
        self._bm25 = bm25
        self._gpu_lock = gpu_lock

    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        domain: str,
        version: str | None = None,
        embedding_dim: int | None = None,
        fingerprint: str | None = None,
        config: IndexConfig | None = None,
    ) -> IndexHandle:
        """Open an index version directory; `version` defaults to its build id (for unpublished builds).

        `embedding_dim` (the backbone's) is checked against the index: a mismatch raises DimensionMismatch.
        `fingerprint`, when given, must equal the encoder fingerprint the index was built with
        (EncoderMismatch otherwise): vectors from other frozen weights live in another space. `config`
        overrides the search-time settings recorded at build (default retrieval mode, fusion, efSearch,
        nprobe).
        """
        directory = Path(directory)
        if not (directory / BUILD_FILE).is_file():
            raise IndexVersionNotFound(f"no index version at {directory}")
        info = BuildInfo.read(directory)
        if embedding_dim is not None and info.dim != embedding_dim:
            raise DimensionMismatch(
                f"index {directory.name} holds {info.dim}-dim vectors; the backbone produces {embedding_dim}",
                expected=embedding_dim,
                found=info.dim,
            )
        if fingerprint is not None and info.encoder_fingerprint != fingerprint:
            raise EncoderMismatch(
                f"index {directory.name} was encoded by backbone {info.encoder_fingerprint}, "
                f"not {fingerprint}"
            )
        config = config or info.config
        index = faiss.read_index(str(directory / INDEX_FILE))
        if index.d != info.dim:
            raise DimensionMismatch(
                f"{INDEX_FILE} holds {index.d}-dim vectors but build.json says {info.dim}",
                expected=info.dim,
                found=index.d,
            )
        _tune(index, config)
        passages = tuple(read_passages(directory / PASSAGES_FILE))
        if len(passages) != index.ntotal or len(passages) != info.passage_count:
            raise IndexVersionNotFound(
                f"index {directory.name} is incomplete: {index.ntotal} vectors, {len(passages)} passages, "
                f"build.json says {info.passage_count}"
            )
        bm25 = Bm25Index.load(directory / BM25_DIR) if (directory / BM25_DIR).is_dir() else None
        if config.retrieval != "dense" and bm25 is None:
            config = replace(config, retrieval="dense")
        index, gpu_lock = _maybe_to_gpu(index, config)
        return cls(
            domain=domain,
            version=version or info.build_id,
            directory=directory,
            info=info,
            config=config,
            passages=passages,
            index=index,
            bm25=bm25,
            gpu_lock=gpu_lock,
        )

    # --- what it is -----------------------------------------------------------------------------------------

    @property
    def domain(self) -> str:
        return self._domain

    @property
    def version(self) -> str:
        return self._version

    @property
    def key(self) -> tuple[str, str]:
        return self._domain, self._version

    @property
    def directory(self) -> Path:
        return self._directory

    @property
    def info(self) -> BuildInfo:
        return self._info

    @property
    def config(self) -> IndexConfig:
        return self._config

    @property
    def size(self) -> int:
        return len(self._passages)

    @property
    def dim(self) -> int:
        return self._info.dim

    @property
    def passages(self) -> tuple[Passage, ...]:
        return self._passages

    @property
    def modes(self) -> tuple[str, ...]:
        return ("dense", "bm25", "hybrid") if self._bm25 is not None else ("dense",)

    def __repr__(self) -> str:
        return (
            f"IndexHandle(domain={self._domain!r}, version={self._version!r}, size={self.size}, "
            f"factory={self._info.factory!r})"
        )

    # --- searching ------------------------------------------------------------------------------------------

    def search(
        self,
        query_embeddings: np.ndarray | object | None = None,
        query_texts: Sequence[str] | None = None,
        k: int = 5,
        mode: RetrievalMode | None = None,
        fusion: FusionMethod | None = None,
    ) -> list[list[Hit]]:
        """Top-k passages per query, best first.

        `query_embeddings` [n, dim] (numpy or torch) serve dense retrieval, `query_texts` (n strings) BM25;
        hybrid needs both. `mode` defaults to the domain's configured retrieval, `fusion` to its fusion
        method. BM25 returns only passages sharing a word with the query, so a row may hold fewer than k hits.
        """
        mode = mode or self._config.retrieval
        if mode not in ("dense", "bm25", "hybrid"):
            raise ValueError(f"retrieval mode must be dense, bm25 or hybrid, got {mode!r}")
        if mode != "dense" and self._bm25 is None:
            raise RetrievalModeUnavailable(
                f"index {self._domain}/{self._version} was built without BM25; "
                "only dense retrieval is available"
            )
        fusion = fusion or self._config.fusion
        if fusion not in ("rrf", "weighted"):
            raise ValueError(f"fusion must be rrf or weighted, got {fusion!r}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k = min(k, self.size)
        queries = self._as_matrix(query_embeddings) if mode != "bm25" else None  # [n, dim]
        if mode != "dense" and query_texts is None:
            raise ValueError(f"{mode} retrieval needs query_texts")
        if mode == "dense":
            scores, ids = self._dense(queries, k)
            return [self._hits(row_ids, row_scores) for row_ids, row_scores in zip(ids, scores)]
        if queries is not None and len(query_texts) != len(queries):
            raise ValueError(f"{len(query_texts)} query texts for {len(queries)} query embeddings")
        if mode == "bm25":
            return [self._hits(*self._bm25.top_k(text, k)) for text in query_texts]
        depth = min(max(k, self._config.fusion_depth), self.size)
        dense_scores, dense_ids = self._dense(queries, depth)  # [n, depth] each
        results = []
        for text, row_ids, row_scores in zip(query_texts, dense_ids, dense_scores):
            keep = row_ids >= 0
            lexical_ids, lexical_scores = self._bm25.top_k(text, depth)
            if fusion == "weighted":
                fused = weighted_fusion(
                    (row_ids[keep], row_scores[keep]),
                    (lexical_ids, lexical_scores),
                    self._config.dense_weight,
                )
            else:
                fused = reciprocal_rank_fusion([row_ids[keep], lexical_ids], k=self._config.rrf_k)
            results.append([Hit(self._passages[i], score) for i, score in fused[:k]])
        return results

    def _as_matrix(self, query_embeddings) -> np.ndarray:
        if query_embeddings is None:
            raise ValueError("dense and hybrid retrieval need query_embeddings")
        if hasattr(query_embeddings, "detach"):  # a torch tensor, possibly on GPU or in bf16
            query_embeddings = query_embeddings.detach().float().cpu().numpy()
        queries = np.ascontiguousarray(query_embeddings, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None, :]
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise DimensionMismatch(
                f"query embeddings have shape {queries.shape}; "
                f"index {self._domain}/{self._version} needs [n, "
                f"{self.dim}]",
                expected=self.dim,
                found=queries.shape[-1],
            )
        return queries

    def _dense(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._gpu_lock is None:
            return self._index.search(queries, k)  # [n, k] scores, [n, k] ids (-1 where fewer found)
        with self._gpu_lock:
            return self._index.search(queries, k)

    def _hits(self, ids: np.ndarray, scores: np.ndarray) -> list[Hit]:
        return [Hit(self._passages[i], float(s)) for i, s in zip(ids.tolist(), scores.tolist()) if i >= 0]


def _tune(index: faiss.Index, config: IndexConfig) -> None:
    """Search-time knobs: efSearch for HNSW, nprobe for IVF; other index types have none."""
    inner = faiss.downcast_index(index)
    hnsw = getattr(inner, "hnsw", None)
    if hnsw is not None:
        hnsw.efSearch = config.hnsw_ef_search
    with contextlib.suppress(RuntimeError, AttributeError):  # not an IVF index
        faiss.extract_index_ivf(index).nprobe = config.ivf_nprobe


def _maybe_to_gpu(index: faiss.Index, config: IndexConfig) -> tuple[faiss.Index, threading.Lock | None]:
    if not config.use_gpu or not faiss_gpu_available():
        return index, None
    if getattr(faiss.downcast_index(index), "hnsw", None) is not None:
        return index, None  # FAISS has no GPU HNSW; it stays on CPU
    try:
        return faiss.index_cpu_to_all_gpus(index), threading.Lock()
    except (RuntimeError, AttributeError) as exc:
        log.warning("keeping index on CPU: FAISS could not move it to the GPU (%s)", exc)
        return index, None

"""Building an index version: encode passages, build the FAISS inner-product index and BM25, write it out.

An index version is one directory, written under a staging name and renamed into place when complete:

    index.faiss       FAISS index, inner product, built from the factory string in `IndexConfig`
    passages.jsonl    the passages in index order (row i of the index is line i)
    embeddings.npy    [n, dim] float32, only with `IndexConfig.save_embeddings`
    bm25/             BM25 index for lexical and hybrid retrieval (unless `IndexConfig.bm25` is off)
    build.json        how it was built: encoder fingerprint, adapter version, dims, factory string,
                      passage count, passages checksum, index settings, timings
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import faiss
import numpy as np

from backbone import Backbone, Passage

from .chunking import passages_checksum, write_passages
from .encoder import EncodeConfig, adapter_digest, encode_passages
from .errors import InvalidIndexConfig
from .files import atomic_directory
from .lexical import Bm25Index

log = logging.getLogger(__name__)

RetrievalMode = Literal["dense", "bm25", "hybrid"]
FusionMethod = Literal["rrf", "weighted"]
BuildProgressFn = Callable[[str, int, int], None]  # (stage, done, total)

INDEX_FILE = "index.faiss"
PASSAGES_FILE = "passages.jsonl"
EMBEDDINGS_FILE = "embeddings.npy"
BM25_DIR = "bm25"
BUILD_FILE = "build.json"
FORMAT = 1


@dataclass(frozen=True)
class IndexConfig:
    """How a domain's index is built and searched by default.

    `factory` is a FAISS index factory string (always with inner-product metric), or "auto": exact "Flat"
    below `flat_max` passages and `large_factory` (HNSW, 32 links) from there on. `retrieval` is the domain's
    default mode; a request may ask for another. The default is hybrid with weighted fusion: with the base
    (unadapted) encoders it matched or beat both BM25 and dense recall@5/@20 on all three shared domains,
    where RRF fell below BM25 on two (benchmarks/results/indexing_recall.json). An index built without BM25
    searches dense by default whatever `retrieval` says.
    """

    factory: str = "auto"
    flat_max: int = 20_000
    large_factory: str = "HNSW32"
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 128
    ivf_nprobe: int = 32
    retrieval: RetrievalMode = "hybrid"
    fusion: FusionMethod = "weighted"
    rrf_k: int = 60
    dense_weight: float = 0.5
    fusion_depth: int = 100  # candidates taken from each retriever before fusing
    bm25: bool = True
    bm25_k1: float = 1.5
    bm25_b: float = 0.75
    save_embeddings: bool = False
    use_gpu: bool = True  # FAISS on GPU when faiss-gpu and CUDA are present (Flat and IVF only)

    def __post_init__(self) -> None:
        if self.retrieval not in ("dense", "bm25", "hybrid"):
            raise InvalidIndexConfig(f"retrieval must be dense, bm25 or hybrid, got {self.retrieval!r}")
        if self.fusion not in ("rrf", "weighted"):
            raise InvalidIndexConfig(f"fusion must be rrf or weighted, got {self.fusion!r}")
        if not 0.0 <= self.dense_weight <= 1.0:
            raise InvalidIndexConfig(f"dense_weight must be in [0, 1], got {self.dense_weight}")

    def factory_for(self, passage_count: int) -> str:
        if self.factory != "auto":
            return self.factory
        return "Flat" if passage_count < self.flat_max else self.large_factory

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> IndexConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class BuildInfo:
    """The build config saved beside an index (build.json) and in its store manifest.

    `build_id` names the build; the store assigns the index *version* id when the directory is published.
    """

    build_id: str
    dim: int
    factory: str
    passage_count: int
    passages_checksum: str
    encoder_fingerprint: str
    passage_adapter: str  # digest of the passage-encoder LoRA weights, "base" for none
    adapter_version: str | None
    passages_version: str | None
    dtype: str
    max_passage_tokens: int
    index: dict
    created_at: str
    seconds: dict = field(default_factory=dict)
    encoded_on: str = "local"  # where the passages were encoded: "local" (the build's process) or "ray"
    metric: str = "inner_product"
    faiss_version: str = faiss.__version__
    format: int = FORMAT

    @property
    def config(self) -> IndexConfig:
        return IndexConfig.from_dict(self.index)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> BuildInfo:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def read(cls, directory: Path) -> BuildInfo:
        return cls.from_dict(json.loads((Path(directory) / BUILD_FILE).read_text()))


def faiss_gpu_available() -> bool:
    """True when this FAISS build has GPU support and sees a GPU; faiss-cpu simply reports none."""
    try:
        return faiss.get_num_gpus() > 0
    except AttributeError:
        return False


def build_faiss(embeddings: np.ndarray, factory: str, config: IndexConfig = IndexConfig()) -> faiss.Index:
    """An inner-product FAISS index over `embeddings` [n, dim], trained if the type needs it; a CPU index."""
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)  # [n, dim]
    n, dim = embeddings.shape
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise InvalidIndexConfig(f"FAISS cannot build factory string {factory!r}: {exc}") from None
    hnsw = getattr(faiss.downcast_index(index), "hnsw", None)
    if hnsw is not None:
        hnsw.efConstruction = config.hnsw_ef_construction
    target = index
    if config.use_gpu and faiss_gpu_available() and hnsw is None:
        try:
            target = faiss.index_cpu_to_all_gpus(index)
        except (RuntimeError, AttributeError) as exc:
            log.warning("FAISS GPU build unavailable for %s (%s); building on CPU", factory, exc)
    if not target.is_trained:
        rng = np.random.default_rng(0)
        sample = embeddings if n <= 100_000 else embeddings[rng.choice(n, 100_000, replace=False)]
        try:
            target.train(sample)
        except RuntimeError as exc:
            raise InvalidIndexConfig(
                f"FAISS factory {factory!r} cannot be trained on {n} passages: {exc}"
            ) from None
    target.add(embeddings)
    if target is not index:
        index = faiss.index_gpu_to_cpu(target)
    return index


def write_index(
    directory: Path,
    passages: list[Passage],
    embeddings: np.ndarray,
    *,
    build_id: str,
    encoder_fingerprint: str,
    config: IndexConfig = IndexConfig(),
    passage_adapter: str = "base",
    adapter_version: str | None = None,
    passages_version: str | None = None,
    dtype: str = "float32",
    max_passage_tokens: int = 0,
    checksum: str | None = None,
    seconds: dict | None = None,
    encoded_on: str = "local",
    on_progress: BuildProgressFn | None = None,
) -> BuildInfo:
    """Write a complete index version directory from ready embeddings [n, dim] (staged, then renamed).

    `directory` must not exist yet. The keyword arguments are the provenance recorded in build.json.
    """
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)  # [n, dim]
    if embeddings.ndim != 2 or embeddings.shape[0] != len(passages):
        raise ValueError(f"embeddings {embeddings.shape} do not match {len(passages)} passages")
    seconds = dict(seconds or {})
    factory = config.factory_for(len(passages))
    with atomic_directory(directory) as staging:
        started = time.perf_counter()
        if on_progress is not None:
            on_progress("indexing", 0, len(passages))
        index = build_faiss(embeddings, factory, config)
        faiss.write_index(index, str(staging / INDEX_FILE))
        seconds["faiss"] = round(time.perf_counter() - started, 3)
        if on_progress is not None:
            on_progress("indexing", len(passages), len(passages))
        written_checksum = write_passages(passages, staging / PASSAGES_FILE)
        if checksum is not None and checksum != written_checksum:
            raise ValueError("passages changed while the index was being built")
        if config.save_embeddings:
            np.save(staging / EMBEDDINGS_FILE, embeddings, allow_pickle=False)
        if config.bm25:
            started = time.perf_counter()
            Bm25Index.build(passages, config.bm25_k1, config.bm25_b).save(staging / BM25_DIR)
            seconds["bm25"] = round(time.perf_counter() - started, 3)
        info = BuildInfo(
            build_id=build_id,
            dim=int(embeddings.shape[1]),
            factory=factory,
            passage_count=len(passages),
            passages_checksum=written_checksum,
            encoder_fingerprint=encoder_fingerprint,
            passage_adapter=passage_adapter,
            adapter_version=adapter_version,
            passages_version=passages_version,
            dtype=dtype,
            max_passage_tokens=max_passage_tokens,
            index=config.to_dict(),
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            seconds=seconds,
            encoded_on=encoded_on,
        )
        (staging / BUILD_FILE).write_text(json.dumps(info.to_dict(), indent=2, sort_keys=True))
    return info


def build_index(
    backbone: Backbone,
    passages: list[Passage],
    directory: Path,
    *,
    build_id: str,
    adapter: str | None = None,
    adapter_version: str | None = None,
    passages_version: str | None = None,
    config: IndexConfig = IndexConfig(),
    encode: EncodeConfig = EncodeConfig(),
    work_dir: Path | None = None,
    on_progress: BuildProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> BuildInfo:
    """Encode `passages` with the passage encoder under `adapter` and write the index directory `directory`.

    `adapter` is a loaded adapter-set key (None: the base encoder); `adapter_version` is recorded for people
    and the registry. With `work_dir`, encoding is resumable by shard (see `indexing.encoder`).
    """
    checksum = passages_checksum(passages)
    started = time.perf_counter()
    embeddings = encode_passages(
        backbone,
        passages,
        adapter=adapter,
        config=encode,
        work_dir=work_dir,
        checksum=checksum,
        on_progress=(lambda done, total: on_progress("encoding", done, total)) if on_progress else None,
        should_stop=should_stop,
    )  # [n, dim]
    encode_seconds = time.perf_counter() - started
    return write_index(
        directory,
        passages,
        embeddings,
        build_id=build_id,
        encoder_fingerprint=backbone.fingerprint,
        config=config,
        passage_adapter=adapter_digest(backbone, adapter),
        adapter_version=adapter_version,
        passages_version=passages_version,
        dtype=str(backbone.dtype).removeprefix("torch."),
        max_passage_tokens=backbone.config.max_passage_tokens,
        checksum=checksum,
        seconds={"encode": round(encode_seconds, 3)},
        encoded_on="ray" if encode.ray is not None else "local",
        on_progress=on_progress,
    )

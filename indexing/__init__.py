"""Passage chunking, encoding, FAISS build/search, hybrid retrieval, index versions and async rebuilds.

Imports `backbone` and `storage`, never `service` or `adapters`.
"""

from .builder import BuildInfo, IndexConfig, build_index, write_index
from .chunking import ChunkConfig, load_corpus, passages_checksum, read_passages, write_passages
from .encoder import EncodeConfig, encode_passages
from .errors import (
    AdapterMismatch,
    DimensionMismatch,
    EmptyCorpus,
    EncoderMismatch,
    IndexingError,
    IndexNotReady,
    IndexVersionNotFound,
    InvalidIndexConfig,
    LiveIndexMoved,
    MalformedPassages,
    RebuildCancelled,
    RebuildFailed,
    RetrievalModeUnavailable,
)
from .ingest import IngestResult, ingest
from .rebuild import RebuildJob, RebuildProgress, RebuildResult, RebuildSpec, RebuildState
from .searcher import Hit, IndexHandle
from .versions import IndexVersions

__all__ = [
    "AdapterMismatch",
    "BuildInfo",
    "ChunkConfig",
    "DimensionMismatch",
    "EmptyCorpus",
    "EncodeConfig",
    "EncoderMismatch",
    "Hit",
    "IndexConfig",
    "IndexHandle",
    "IndexNotReady",
    "IndexVersionNotFound",
    "IndexVersions",
    "IndexingError",
    "IngestResult",
    "InvalidIndexConfig",
    "LiveIndexMoved",
    "MalformedPassages",
    "RebuildCancelled",
    "RebuildFailed",
    "RebuildJob",
    "RebuildProgress",
    "RebuildResult",
    "RebuildSpec",
    "RebuildState",
    "RetrievalModeUnavailable",
    "build_index",
    "encode_passages",
    "ingest",
    "load_corpus",
    "passages_checksum",
    "read_passages",
    "write_index",
    "write_passages",
]

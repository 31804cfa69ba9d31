"""Passage chunking, encoding, FAISS build/search, hybrid retrieval, index versions and async rebuilds.

Imports `backbone` and `storage`, never `service` or `adapters`.
"""

from .builder import BuildInfo, IndexConfig, build_index, write_index
from .chunking import ChunkConfig, load_corpus, passages_checksum, read_passages, write_passages
from .encoder import EncodeConfig, encode_passages
from .errors import (DimensionMismatch, DomainNotFound, EmptyCorpus, EncoderMismatch, IndexingError,
                     IndexNotReady, IndexVersionNotFound, InvalidIndexConfig, MalformedPassages, RebuildCancelled,
                     RebuildFailed, RetrievalModeUnavailable)
from .handles import LiveIndexes
from .searcher import Hit, IndexHandle

__all__ = [
    "BuildInfo", "ChunkConfig", "DimensionMismatch", "DomainNotFound", "EmptyCorpus", "EncodeConfig",
    "EncoderMismatch", "Hit", "IndexConfig", "IndexHandle", "IndexNotReady", "IndexVersionNotFound",
    "IndexingError", "InvalidIndexConfig", "LiveIndexes", "MalformedPassages", "RebuildCancelled", "RebuildFailed",
    "RetrievalModeUnavailable", "build_index", "encode_passages", "load_corpus", "passages_checksum",
    "read_passages", "write_index", "write_passages",
]

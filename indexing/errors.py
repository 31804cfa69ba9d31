"""Typed errors of indexing, each with a stable `code` and HTTP `status` the service maps to problem details.

Callers tell errors apart by class or `code`, never by message text; the message is the human "why". A
domain that does not exist is storage's `DomainNotFound`, raised as it is.
"""

from __future__ import annotations


class IndexingError(Exception):
    code = "indexing_error"
    status = 500


class IndexVersionNotFound(IndexingError):
    code = "index_version_not_found"
    status = 404


class EmptyCorpus(IndexingError):
    code = "empty_corpus"
    status = 422


class MalformedPassages(IndexingError):
    """A corpus file that cannot be read; `line` is the 1-based line number of the offending JSONL record."""

    code = "malformed_passages"
    status = 422

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None):
        where = ":".join(str(part) for part in (path, line) if part is not None)
        super().__init__(f"{where}: {message}" if where else message)
        self.reason = message  # without the path: what a client that uploaded the file is told
        self.path = path
        self.line = line


class DimensionMismatch(IndexingError):
    """The index was built with embeddings of another width than the loaded backbone produces."""

    code = "dimension_mismatch"
    status = 409

    def __init__(self, message: str, *, expected: int, found: int):
        super().__init__(message)
        self.expected = expected
        self.found = found


class EncoderMismatch(IndexingError):
    """The index was encoded by another frozen backbone (fingerprint differs): its vectors are elsewhere."""

    code = "index_encoder_mismatch"
    status = 409


class RetrievalModeUnavailable(IndexingError):
    """The request asked for BM25 or hybrid retrieval from an index built without a BM25 part."""

    code = "retrieval_mode_unavailable"
    status = 422


class InvalidIndexConfig(IndexingError):
    """An index setting FAISS cannot honour (unknown factory string, too few passages to train)."""

    code = "invalid_index_config"
    status = 422


class LiveIndexMoved(IndexingError):
    """The live index changed while a new one was built; the new version is kept but not made live."""

    code = "live_index_moved"
    status = 409


class AdapterMismatch(IndexingError):
    """An index encoded with one adapter version cannot go live while the domain serves another."""

    code = "index_adapter_mismatch"
    status = 409


class IndexNotReady(IndexingError):
    """The domain has no index to answer from yet (first build still running, or never ingested)."""

    code = "index_not_ready"
    status = 503
    retry_after = 5


class RebuildFailed(IndexingError):
    """A rebuild ended without a new live index; the message says why, the old version stays live."""

    code = "rebuild_failed"
    status = 500


class RebuildCancelled(RebuildFailed):
    code = "rebuild_cancelled"
    status = 409

"""Index and passages versions of each domain on the artifact store, and a local cache of fetched versions.

Layout (storage's registry): `domains/<d>/passages/<version>/passages.jsonl` and
`domains/<d>/indexes/<version>/` holding one index directory (see `indexing.builder`). The index manifest's
metadata carries the build config (and `passages_version` at its top level, which the registry's `promote`
follows). Versions are only ever added: a rebuild publishes a new version next to the live one, then moves the
live pointer by compare-and-swap.

Fetched versions are cached under `<cache_dir>/<domain>/indexes/<version>/`, downloaded with checksums
verified and renamed into place whole, so a cached directory is always complete and never rewritten.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from storage import ArtifactKind, DomainRegistry, LivePointer, PreconditionFailed
from storage import VersionNotFound as StoreVersionNotFound

from .builder import BUILD_FILE, BuildInfo, IndexConfig
from .chunking import passages_checksum, read_passages
from .errors import AdapterMismatch, IndexNotReady, IndexVersionNotFound, LiveIndexMoved
from .searcher import IndexHandle

log = logging.getLogger(__name__)

PASSAGES_FILE = "passages.jsonl"


@dataclass(frozen=True)
class Unchecked:
    """Marks a live-pointer field that `make_live` should not compare (as opposed to expecting None)."""


UNCHECKED = Unchecked()


class IndexVersions:
    """Publishes, lists, fetches and opens a domain's index versions, and moves its live index pointer."""

    def __init__(self, registry: DomainRegistry, cache_dir: Path):
        self._registry = registry
        self._cache_dir = Path(cache_dir)
        self._fetch_locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()

    @property
    def registry(self) -> DomainRegistry:
        return self._registry

    # --- publishing -----------------------------------------------------------------------------------------

    def publish_passages(self, domain: str, passages_file: Path, source: str | None = None) -> str:
        """Store a canonical passages JSONL as a new passages version; returns the version id."""
        passages = read_passages(passages_file)
        metadata = {
            "passage_count": len(passages),
            "passages_checksum": passages_checksum(passages),
            "source": source,
        }
        with _domain_errors(domain):
            manifest = self._registry.publish(
                domain, ArtifactKind.PASSAGES, {PASSAGES_FILE: Path(passages_file)}, metadata
            )
        log.info(
            "published passages version %s of domain %s (%d passages)",
            manifest.version,
            domain,
            len(passages),
        )
        return manifest.version

    def publish_index(self, domain: str, directory: Path, passages_version: str | None = None) -> str:
        """Store a built index directory as a new index version; returns the version id.

        `passages_version` records which passages version the index was built from, when that version was
        published after the build (new corpora are published only once the build succeeded).
        """
        directory = Path(directory)
        info = BuildInfo.read(directory)
        if passages_version is not None and info.passages_version != passages_version:
            # The directory is not visible to anyone before it is published; record the version it came from.
            info = replace(info, passages_version=passages_version)
            (directory / BUILD_FILE).write_text(json.dumps(info.to_dict(), indent=2, sort_keys=True))
        metadata = {
            "passages_version": info.passages_version,
            "adapter_version": info.adapter_version,
            "encoder_fingerprint": info.encoder_fingerprint,
            "dim": info.dim,
            "factory": info.factory,
            "passage_count": info.passage_count,
            "passages_checksum": info.passages_checksum,
            "build": info.to_dict(),
        }
        with _domain_errors(domain):
            manifest = self._registry.publish(domain, ArtifactKind.INDEXES, directory, metadata)
        log.info(
            "published index version %s of domain %s (%s, %d passages)",
            manifest.version,
            domain,
            info.factory,
            info.passage_count,
        )
        return manifest.version

    def adopt(self, domain: str, version: str, directory: Path) -> Path:
        """Move a just-published build directory into the cache as `version`, saving a download; when the
        cache already has it or lies on another filesystem the directory is left where it is and the cache
        unchanged."""
        target = self._version_dir(domain, version)
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(directory, target)
        except OSError:
            return Path(directory)
        return target

    # --- reading --------------------------------------------------------------------------------------------

    def versions(self, domain: str) -> list[str]:
        """Complete index versions of `domain`, oldest first."""
        with _domain_errors(domain):
            return [m.version for m in self._registry.list_versions(domain, ArtifactKind.INDEXES)]

    def build_info(self, domain: str, version: str) -> BuildInfo:
        """The build config of a published version, from its manifest (no download)."""
        with _domain_errors(domain, version):
            manifest = self._registry.read_manifest(domain, ArtifactKind.INDEXES, version)
        return BuildInfo.from_dict(manifest.metadata["build"])

    def live(self, domain: str) -> LivePointer:
        with _domain_errors(domain):
            return self._registry.live(domain)

    def fetch(self, domain: str, version: str) -> Path:
        """A complete local copy of an index version, downloaded (checksums verified) on first use."""
        target = self._version_dir(domain, version)
        if (target / BUILD_FILE).is_file():
            return target
        with self._fetch_lock(domain, version):
            if not (target / BUILD_FILE).is_file():
                with _domain_errors(domain, version):
                    self._registry.download(domain, ArtifactKind.INDEXES, version, target)
        return target

    def fetch_passages(self, domain: str, version: str, destination: Path) -> Path:
        """Download a passages version into `destination` (a new directory); returns the passages file."""
        with _domain_errors(domain, version):
            self._registry.download(domain, ArtifactKind.PASSAGES, version, destination)
        return Path(destination) / PASSAGES_FILE

    def open(
        self,
        domain: str,
        version: str,
        *,
        embedding_dim: int,
        fingerprint: str | None = None,
        config: IndexConfig | None = None,
    ) -> IndexHandle:
        """Fetch (if needed) and open one index version; see `IndexHandle.open` for the checks made."""
        return IndexHandle.open(
            self.fetch(domain, version),
            domain=domain,
            version=version,
            embedding_dim=embedding_dim,
            fingerprint=fingerprint,
            config=config,
        )

    def open_live(
        self,
        domain: str,
        *,
        embedding_dim: int,
        fingerprint: str | None = None,
        config: IndexConfig | None = None,
    ) -> IndexHandle:
        """Open the version the domain's live pointer names; IndexNotReady while it names none."""
        version = self.live(domain).index_version
        if version is None:
            raise IndexNotReady(f"domain {domain!r} has no live index yet")
        return self.open(domain, version, embedding_dim=embedding_dim, fingerprint=fingerprint, config=config)

    # --- the live pointer -----------------------------------------------------------------------------------

    def make_live(
        self,
        domain: str,
        index_version: str,
        *,
        passages_version: str | None = None,
        replacing: str | Unchecked | None = UNCHECKED,
        adapter_version: str | Unchecked | None = UNCHECKED,
        attempts: int = 5,
    ) -> LivePointer:
        """Point the domain's live index (and passages, if given) at new versions, by compare-and-swap.

        `replacing`: the index version expected live now (None: no index yet); if another rebuild moved it
        meanwhile, LiveIndexMoved is raised and nothing changes. `adapter_version`: the adapter version the
        index was encoded with; it must be the live adapter, else AdapterMismatch (a query encoder and an
        index from different adapters would not match). A concurrent change to other fields is retried on the
        fresh pointer.
        """
        for attempt in range(attempts):
            pointer = self.live(domain)
            if not isinstance(replacing, Unchecked) and pointer.index_version != replacing:
                raise LiveIndexMoved(
                    f"domain {domain!r} now serves index {pointer.index_version}, not {replacing}; "
                    f"index {index_version} was not made live"
                )
            if not isinstance(adapter_version, Unchecked) and pointer.adapter_version != adapter_version:
                raise AdapterMismatch(
                    f"domain {domain!r} serves adapter {pointer.adapter_version}, "
                    f"but index {index_version} was "
                    f"encoded with adapter {adapter_version}; it was not made live"
                )
            try:
                with _domain_errors(domain, index_version):
                    return self._registry.set_live(
                        domain,
                        index_version=index_version,
                        passages_version=passages_version,
                        expected_etag=pointer.etag,
                    )
            except PreconditionFailed:
                log.info(
                    "live pointer of %s changed concurrently (attempt %d); retrying", domain, attempt + 1
                )
        raise LiveIndexMoved(
            f"live pointer of domain {domain!r} kept changing; index {index_version} not made live"
        )

    # --- internals ------------------------------------------------------------------------------------------

    def _version_dir(self, domain: str, version: str) -> Path:
        return self._cache_dir / domain / "indexes" / version

    def _fetch_lock(self, domain: str, version: str) -> threading.Lock:
        with self._locks_guard:
            return self._fetch_locks.setdefault((domain, version), threading.Lock())


@contextmanager
def _domain_errors(domain: str, version: str | None = None) -> Iterator[None]:
    """The store's missing version as indexing's IndexVersionNotFound (a missing domain passes as it is)."""
    try:
        yield
    except StoreVersionNotFound as exc:
        raise IndexVersionNotFound(str(exc)) from exc

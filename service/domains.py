"""Which adapter and index version serve each domain, resolved once per request at admission.

The store's live pointer (`domains/<d>/live.json`) is the truth. The catalog keeps one immutable `Serving`
record per domain, an (adapter version, index handle) pair, and swaps the whole mapping atomically, so a
request always gets a pair that belongs together. Before a new pair goes live here its index is opened and its
adapter loaded into host memory, so the first request after a promotion does not pay for loading it.

Changes arrive three ways: promotion or rollback through this service (applied at once), the poller re-reading
live pointers every `poll_interval_s` (promotions by other replicas, runs, `ragadapt ingest`), and ingestion
jobs finishing. A change that fails to load (store down, incompatible adapter) leaves the previous pair
serving and is retried on the next poll.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from adapters import AdapterIncompatible, AdapterRef, AdapterRegistry
from backbone import Backbone
from indexing import IndexHandle
from indexing.versions import IndexVersions
from storage import ArtifactKind, DomainNotFound, DomainRegistry, LivePointer
from storage.registry import DOMAIN_NAME

from .adapter_cache import AdapterCache
from .metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Serving:
    """What answers one domain now. `index` None: no index is live yet; `error`: why nothing can serve."""

    domain: str
    description: str
    retrieval: str | None  # the domain's default retrieval mode (None: the index's)
    adapter: AdapterRef | None  # what requests run on; None: the base backbone (or nothing loads: `error`)
    index: IndexHandle | None
    pointer: LivePointer
    error: Exception | None = None

    @property
    def adapter_version(self) -> str | None:
        return self.pointer.adapter_version

    @property
    def index_version(self) -> str | None:
        return self.index.version if self.index is not None else None

    @property
    def default_retrieval(self) -> str:
        if self.retrieval:
            return self.retrieval
        return self.index.config.retrieval if self.index is not None else "dense"


class DomainCatalog:
    def __init__(
        self,
        registry: DomainRegistry,
        adapters: AdapterRegistry,
        versions: IndexVersions,
        cache: AdapterCache,
        backbone: Backbone,
        metrics: Metrics,
        *,
        pinned: list[str],
        discover_every_s: float = 10.0,
    ):
        self._registry = registry
        self._adapters = adapters
        self._versions = versions
        self._cache = cache
        self._backbone = backbone
        self._metrics = metrics
        self._pinned = frozenset(pinned)
        self._discover_every_s = discover_every_s
        self._serving: Mapping[str, Serving] = MappingProxyType({})
        self._handles: dict[tuple[str, str], IndexHandle] = {}
        self._write_lock = threading.Lock()
        self._domain_locks: dict[str, threading.Lock] = {}
        self._last_discovery = float("-inf")
        self._misses: dict[str, float] = {}  # unknown names asked for lately: not re-read before a poll

    # --- reading (any thread, lock-free) --------------------------------------------------------------------

    def find(self, domain: str) -> Serving | None:
        return self._serving.get(domain)

    def names(self) -> list[str]:
        return sorted(self._serving)

    def lookup(self, domain: str) -> Serving:
        """The serving record of `domain`, reading it from the store if this process has not seen it yet
        (blocking: call from a worker thread). Raises storage's DomainNotFound for unknown names."""
        serving = self._serving.get(domain)
        if serving is not None:
            return serving
        if not isinstance(domain, str) or not DOMAIN_NAME.fullmatch(domain):
            raise DomainNotFound(f"no domain named {domain!r}")
        missed = self._misses.get(domain)
        if missed is not None and time.monotonic() - missed < self._discover_every_s:
            raise DomainNotFound(f"no domain named {domain!r}")
        try:
            return self.refresh_domain(domain)
        except DomainNotFound:
            self._misses[domain] = time.monotonic()
            raise

    # --- refreshing (worker threads) ------------------------------------------------------------------------

    def refresh(self) -> None:
        """One poll: re-read every known domain's live pointer; every `discover_every_s`, list domains too."""
        names = set(self._serving)
        now = time.monotonic()
        if now - self._last_discovery >= self._discover_every_s:
            listed = {domain.name for domain in self._registry.list_domains()}
            for gone in names - listed:
                self._forget(gone)
            names = listed
            self._last_discovery = now
            self._misses.clear()
        for name in sorted(names):
            try:
                self.refresh_domain(name)
            except DomainNotFound:
                self._forget(name)
            except Exception:  # one domain's trouble must not stop the others from refreshing
                log.exception("refreshing domain %s failed; it keeps its current versions", name)

    def refresh_domain(self, domain: str) -> Serving:
        """Bring one domain up to its live pointer: open the index, warm the adapter, then swap."""
        with self._domain_lock(domain):
            current = self._serving.get(domain)
            pointer = self._registry.live(domain)
            if current is not None and current.error is None and _same(current.pointer, pointer):
                return current
            record = self._registry.get_domain(domain)
            adapter = None
            try:
                index = self._open_index(domain, pointer.index_version) if pointer.index_version else None
                if pointer.adapter_version is not None:
                    adapter = self._adapters.ref(domain, pointer.adapter_version)
                    self._cache.prefetch(adapter).result()
                error = None
            except Exception as exc:
                if current is not None and current.error is None:
                    log.warning(
                        "domain %s: live pointer moved to adapter %s / index %s, which cannot be "
                        "loaded (%s); still serving adapter %s / index %s",
                        domain,
                        pointer.adapter_version,
                        pointer.index_version,
                        exc,
                        current.adapter_version,
                        current.index_version,
                    )
                    return current
                log.warning("domain %s cannot be served: %s", domain, exc)
                index, error = None, exc
            serving = Serving(
                domain,
                record.description,
                record.settings.get("retrieval"),
                adapter,
                index,
                pointer,
                error,
            )
            self._install(serving)
            if (
                current is None
                or current.adapter_version != serving.adapter_version
                or current.index_version != serving.index_version
            ):
                log.info(
                    "domain %s serves adapter %s / index %s",
                    domain,
                    serving.adapter_version or "base",
                    serving.index_version or "none",
                )
            return serving

    def promote(self, domain: str, version: str, expected_etag: str | None = None) -> Serving:
        """Make an adapter version live, checked and loaded first: one that cannot serve never goes live."""
        manifest = self._registry.read_manifest(domain, ArtifactKind.ADAPTERS, version)
        trained_on = manifest.metadata.get("backbone_fingerprint")
        if trained_on != self._backbone.fingerprint:
            raise AdapterIncompatible(
                f"adapter {domain}/{version} was trained on backbone {trained_on!r}, "
                f"but this server runs {self._backbone.fingerprint!r}"
            )
        self._cache.prefetch(AdapterRef.of(domain, manifest)).result()
        index_version = manifest.metadata.get("index_version")
        if index_version:
            self._open_index(domain, index_version)
        self._registry.promote(domain, version, expected_etag=expected_etag)
        return self.refresh_domain(domain)

    def rollback(self, domain: str, expected_etag: str | None = None) -> Serving:
        self._registry.rollback(domain, expected_etag=expected_etag)
        return self.refresh_domain(domain)

    # --- internals ------------------------------------------------------------------------------------------

    def _open_index(self, domain: str, version: str) -> IndexHandle:
        with self._write_lock:
            handle = self._handles.get((domain, version))
        if handle is None:
            handle = self._versions.open(
                domain,
                version,
                embedding_dim=self._backbone.embedding_dim,
                fingerprint=self._backbone.fingerprint,
            )
            with self._write_lock:
                handle = self._handles.setdefault((domain, version), handle)
        return handle

    def _install(self, serving: Serving) -> None:
        with self._write_lock:
            self._serving = MappingProxyType({**self._serving, serving.domain: serving})
            live = {(s.domain, s.index_version) for s in self._serving.values()}
            # Handles no record names any more are dropped; requests still holding one keep it alive.
            self._handles = {key: h for key, h in self._handles.items() if key in live}
            self._publish()

    def forget(self, domain: str) -> None:
        """Stop serving a domain that was deleted (other replicas notice at their next discovery)."""
        self._forget(domain)

    def _forget(self, domain: str) -> None:
        with self._write_lock:
            serving = dict(self._serving)
            if serving.pop(domain, None) is None:
                return
            self._serving = MappingProxyType(serving)
            self._metrics.forget_domain(domain)
            self._publish()

    def _publish(self) -> None:
        """Tell the metrics and the adapter cache what serves now (under the write lock)."""
        self._metrics.set_known_domains(self._serving)
        for serving in self._serving.values():
            self._metrics.set_live(serving.domain, serving.adapter_version, serving.index_version)
        self._cache.set_pinned(
            s.adapter for s in self._serving.values() if s.domain in self._pinned and s.adapter is not None
        )

    def _domain_lock(self, domain: str) -> threading.Lock:
        with self._write_lock:
            return self._domain_locks.setdefault(domain, threading.Lock())


def _same(a: LivePointer, b: LivePointer) -> bool:
    return (a.adapter_version, a.index_version) == (b.adapter_version, b.index_version)

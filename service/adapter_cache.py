"""Adapter sets in three tiers, keyed by `AdapterRef` (domain, version, checksum), like vLLM's LoRA manager
and S-LoRA.

- cold: in the store, as published by `AdapterRegistry`;
- warm: `AdapterSetWeights` in host memory, at most `warm_bytes` of them (LRU);
- hot: attached to the model, at most `hot_slots` sets (LRU), so a batch can name them per row.

A request takes a *lease* on the version it was admitted with (the `AdapterRef` its admission resolved). The
first lease of a cold version starts its one load (download with checksums + read) on the loader executor;
every concurrent request for it awaits that same future, so a version is loaded once however many ask. A
leased set is never dropped from host memory, so a request finishes on the version it started with even after
a promotion. Live versions of pinned domains are never evicted from either tier. Only the model worker thread
attaches and detaches (`make_hot`): it owns the model, and nothing changes the model while it runs a batch.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from pathlib import Path

from adapters import AdapterRef, AdapterRegistry
from backbone import AdapterSetWeights, Backbone

from .metrics import Metrics

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    ref: AdapterRef
    future: Future  # resolves to AdapterSetWeights once loaded
    weights: AdapterSetWeights | None = None  # set (under the cache lock) before the future resolves
    leases: int = 0
    last_used: float = field(default_factory=time.monotonic)
    hot: bool = False  # attached to the model (or being attached)

    @property
    def key(self) -> str:
        return self.ref.key

    @property
    def nbytes(self) -> int:
        weights = self.weights
        return weights.nbytes if weights is not None else 0


class AdapterCache:
    def __init__(
        self,
        backbone: Backbone,
        registry: AdapterRegistry,
        scratch_dir: Path,
        loader: Executor,
        *,
        hot_slots: int,
        warm_bytes: int,
        metrics: Metrics,
    ):
        self._backbone = backbone
        self._registry = registry
        self._scratch = Path(scratch_dir)
        self._loader = loader
        self.hot_slots = hot_slots
        self.warm_bytes = warm_bytes
        self._metrics = metrics
        self._entries: dict[AdapterRef, _Entry] = {}
        self._pinned: frozenset[AdapterRef] = frozenset()
        self._lock = threading.Lock()

    # --- leases (any thread) --------------------------------------------------------------------------------

    def acquire(self, ref: AdapterRef) -> Future:
        """Take a lease on a version and return the future of its weights (loading it if cold). Every call
        needs a matching `release`, also when the future fails."""
        with self._lock:
            entry = self._entries.get(ref)
            if entry is None:
                entry = self._start_load(ref)
                self._metrics.adapter_misses.labels("warm").inc()
            else:
                self._metrics.adapter_hits.labels("warm").inc()
            entry.leases += 1
            entry.last_used = time.monotonic()
            return entry.future

    def release(self, ref: AdapterRef) -> None:
        with self._lock:
            entry = self._entries.get(ref)
            if entry is None:
                return
            entry.leases -= 1
            if entry.leases == 0 and entry.future.done() and entry.weights is None:
                del self._entries[entry.ref]  # a failed load is retried by the next request
            self._trim_warm()

    def prefetch(self, ref: AdapterRef) -> Future:
        """Load a version into host memory without holding it (e.g. right before it is promoted)."""
        with self._lock:
            entry = self._entries.get(ref) or self._start_load(ref)
            entry.last_used = time.monotonic()
            return entry.future

    def set_pinned(self, refs: Iterable[AdapterRef]) -> None:
        """The versions that must stay loaded (the live versions of pinned domains); loads them if cold."""
        refs = frozenset(refs)
        with self._lock:
            self._pinned = refs
            for ref in refs:
                if ref not in self._entries:
                    self._start_load(ref)
            self._trim_warm()

    # --- the hot tier (model worker thread only) ------------------------------------------------------------

    def make_hot(self, refs: Iterable[AdapterRef]) -> None:
        """Attach every listed (leased, loaded) set, evicting least recently used hot sets not listed.

        At most `hot_slots` sets may be listed; the model worker splits batches to keep to that."""
        wanted = list(dict.fromkeys(refs))
        if len(wanted) > self.hot_slots:
            raise ValueError(f"{len(wanted)} adapter sets requested at once; only {self.hot_slots} hot slots")
        to_attach: list[_Entry] = []
        with self._lock:
            now = time.monotonic()
            for ref in wanted:
                entry = self._entries[ref]
                entry.last_used = now
                if entry.hot:
                    self._metrics.adapter_hits.labels("hot").inc()
                else:
                    self._metrics.adapter_misses.labels("hot").inc()
                    to_attach.append(entry)
            hot = [e for e in self._entries.values() if e.hot and e.ref not in wanted]
            excess = len(hot) + len(wanted) - self.hot_slots
            # Unpinned sets go first, least recently used first; pinned ones only if nothing else makes room.
            victims = sorted(hot, key=lambda e: (e.ref in self._pinned, e.last_used))[: max(excess, 0)]
            for entry in victims:
                entry.hot = False
            for entry in to_attach:
                entry.hot = True
        for entry in victims:
            self._backbone.remove_adapter_set(entry.key)
            self._metrics.adapter_evictions.labels("hot").inc()
        for entry in to_attach:
            try:
                self._backbone.attach_adapter_set(entry.key, entry.weights)
            except BaseException:
                with self._lock:
                    entry.hot = False
                raise
        with self._lock:
            self._metrics.adapter_hot_sets.set(sum(e.hot for e in self._entries.values()))
            self._trim_warm()

    # --- what is where --------------------------------------------------------------------------------------

    def state(self) -> dict[str, list[str]]:
        """Keys by tier, for health output and tests."""
        with self._lock:
            loaded = [e for e in self._entries.values() if e.weights is not None]
            return {"hot": sorted(e.key for e in loaded if e.hot), "warm": sorted(e.key for e in loaded)}

    # --- internals (under the lock) -------------------------------------------------------------------------

    def _start_load(self, ref: AdapterRef) -> _Entry:
        future: Future = Future()
        entry = _Entry(ref, future)
        self._entries[ref] = entry
        self._loader.submit(self._load, entry)
        return entry

    def _load(self, entry: _Entry) -> None:
        ref = entry.ref
        started = time.perf_counter()
        directory = Path(tempfile.mkdtemp(prefix=f"adapter-{ref.domain}-", dir=self._scratch))
        try:
            self._registry.fetch(ref, directory / "set", expected_fingerprint=self._backbone.fingerprint)
            weights = Backbone.read_adapter_set(directory / "set")
        except BaseException as exc:
            self._metrics.adapter_loads.labels("error").inc()
            log.warning("loading adapter %s failed: %s", ref.key, exc)
            with self._lock:
                if entry.leases == 0 and self._entries.get(entry.ref) is entry:
                    del self._entries[entry.ref]
            entry.future.set_exception(exc)
            return
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        seconds = time.perf_counter() - started
        self._metrics.adapter_loads.labels("ok").inc()
        self._metrics.adapter_load_seconds.observe(seconds)
        log.info(
            "adapter %s loaded from the store in %.0f ms (%.1f MB)",
            ref.key,
            seconds * 1000,
            weights.nbytes / 1e6,
        )
        with self._lock:
            entry.weights = weights
            self._trim_warm()
        entry.future.set_result(weights)

    def _trim_warm(self) -> None:
        """Drop least recently used sets from host memory while over budget; never leased, pinned, hot or
        loading ones (a leased set is what an admitted request will run on)."""
        loaded = [e for e in self._entries.values() if e.weights is not None]
        total = sum(e.nbytes for e in loaded)
        if total > self.warm_bytes:
            evictable = sorted(
                (e for e in loaded if not e.leases and not e.hot and e.ref not in self._pinned),
                key=lambda e: e.last_used,
            )
            for entry in evictable:
                if total <= self.warm_bytes:
                    break
                del self._entries[entry.ref]
                total -= entry.nbytes
                self._metrics.adapter_evictions.labels("warm").inc()
        self._metrics.adapter_warm_bytes.set(total)
        self._metrics.adapter_warm_sets.set(sum(1 for e in self._entries.values() if e.weights is not None))

"""Adapter tiers: one load per version under concurrency, LRU eviction that spares leased and pinned sets."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from adapters import AdapterIncompatible, AdapterRef, AdapterRegistry
from backbone import AdapterSetConfig
from service.adapter_cache import AdapterCache
from service.metrics import Metrics
from storage import DomainRegistry, LocalStore
from tests.service.support import publish_adapter


@pytest.fixture
def published(tmp_path, direct_backbone):
    store = LocalStore(tmp_path / "store")
    DomainRegistry(store).create_domain("alpha")
    adapters = AdapterRegistry(store)
    refs = [
        adapters.ref("alpha", publish_adapter(store, direct_backbone, "alpha", seed, tmp_path / "adapters"))
        for seed in (1, 2, 3)
    ]
    return store, refs


@pytest.fixture
def loader():
    with ThreadPoolExecutor(4) as pool:
        yield pool


def _cache(store, backbone, tmp_path, loader, **kwargs) -> tuple[AdapterCache, Metrics]:
    metrics = Metrics()
    settings = {"hot_slots": 2, "warm_bytes": 1 << 30, **kwargs}
    cache = AdapterCache(backbone, AdapterRegistry(store), tmp_path, loader, metrics=metrics, **settings)
    return cache, metrics


def _loads(metrics: Metrics, result: str = "ok") -> float:
    return metrics.registry.get_sample_value("ragadapt_adapter_loads_total", {"result": result}) or 0.0


def test_concurrent_requests_load_a_version_once(published, direct_backbone, tmp_path, loader):
    store, refs = published
    cache, metrics = _cache(store, direct_backbone, tmp_path, loader)
    with ThreadPoolExecutor(8) as pool:
        futures = list(pool.map(lambda _: cache.acquire(refs[0]), range(16)))
    weights = {id(future.result(timeout=30)) for future in futures}
    assert weights == {id(futures[0].result())}  # one object: one download, one read
    assert _loads(metrics) == 1
    for _ in futures:
        cache.release(refs[0])


def test_warm_tier_evicts_least_recently_used_but_never_a_leased_set(
    published, direct_backbone, tmp_path, loader
):
    store, refs = published
    probe, _ = _cache(store, direct_backbone, tmp_path, loader)
    one_set = probe.prefetch(refs[0]).result().nbytes
    keys = [ref.key for ref in refs]

    cache, metrics = _cache(store, direct_backbone, tmp_path, loader, warm_bytes=int(one_set * 2.5))
    cache.prefetch(refs[0]).result()
    cache.prefetch(refs[1]).result()
    cache.acquire(refs[0]).result()  # a request uses v0: v1 is now the least recently used
    cache.release(refs[0])
    cache.prefetch(refs[2]).result()
    assert cache.state()["warm"] == sorted([keys[0], keys[2]])
    assert metrics.registry.get_sample_value("ragadapt_adapter_evictions_total", {"tier": "warm"}) == 1

    small, _ = _cache(store, direct_backbone, tmp_path, loader, warm_bytes=int(one_set * 0.5))
    small.acquire(refs[0]).result()  # leased: an admitted request will run on it
    small.prefetch(refs[1]).result()
    assert small.state()["warm"] == [keys[0]]
    small.release(refs[0])
    assert small.state()["warm"] == []


def test_pinned_versions_stay_warm(published, direct_backbone, tmp_path, loader):
    store, refs = published
    cache, _ = _cache(store, direct_backbone, tmp_path, loader, warm_bytes=0)
    cache.set_pinned([refs[0]])
    cache.prefetch(refs[1]).result()
    cache.prefetch(refs[0]).result()
    assert cache.state()["warm"] == [refs[0].key]


def test_an_adapter_of_another_backbone_is_refused_and_retried_later(
    published, direct_backbone, tmp_path, loader
):
    store, _ = published
    directory = tmp_path / "foreign"
    direct_backbone.add_adapter_set("foreign")
    direct_backbone.save_adapter_set("foreign", directory)
    direct_backbone.remove_adapter_set("foreign")
    adapters = AdapterRegistry(store)
    manifest = adapters.publish(
        "alpha", directory, backbone_fingerprint="0123456789abcdef", lora=AdapterSetConfig()
    )
    foreign = AdapterRef.of("alpha", manifest)
    cache, metrics = _cache(store, direct_backbone, tmp_path, loader)
    for attempt in (1, 2):
        future = cache.acquire(foreign)
        with pytest.raises(AdapterIncompatible):
            future.result(timeout=30)
        cache.release(foreign)
        assert _loads(metrics, "error") == attempt  # the failure is not cached
    assert cache.state()["warm"] == []

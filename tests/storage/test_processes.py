"""Conditional writes hold across processes, not only threads: two services promoting at once."""

from __future__ import annotations

import multiprocessing

import pytest

from storage import ArtifactKind, DomainRegistry, PreconditionFailed, StoreConfig, open_store


def _promote(config: StoreConfig, version: str, etag: str, barrier, results) -> None:
    """Runs in a fresh interpreter: open the store, wait for the others, promote."""
    registry = DomainRegistry(open_store(config))
    barrier.wait(timeout=60)
    try:
        registry.promote("law", version, expected_etag=etag)
        results.put(("won", version))
    except PreconditionFailed:
        results.put(("lost", version))


@pytest.fixture(params=["local", "s3"])
def config(request, tmp_path) -> StoreConfig:
    if request.param == "local":
        return StoreConfig(backend="local", root=tmp_path / "store")
    return request.getfixturevalue("s3_server").store_config()


def test_concurrent_promotions_from_processes_exactly_one_wins(config, tmp_path):
    registry = DomainRegistry(open_store(config))
    registry.create_domain("law")
    payload = tmp_path / "adapter.bin"
    payload.write_bytes(b"weights")
    versions = [registry.publish("law", ArtifactKind.ADAPTERS, {"a.bin": payload}).version for _ in range(4)]
    etag = registry.promote("law", versions[0]).etag
    contenders = versions[1:]

    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(len(contenders))
    results = context.Queue()
    processes = [
        context.Process(target=_promote, args=(config, version, etag, barrier, results))
        for version in contenders
    ]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=90) for _ in processes]
    for process in processes:
        process.join(timeout=30)

    winners = [version for outcome, version in outcomes if outcome == "won"]
    assert len(winners) == 1 and len(outcomes) == len(contenders)
    live = registry.live("law")
    assert live.adapter_version == winners[0]
    assert [state.adapter_version for state in live.history] == [versions[0]]

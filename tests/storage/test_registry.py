"""Domain registry: domain records, the live pointer (promote, rollback, pin) and retention."""

from __future__ import annotations

import threading

import pytest

from storage import (
    ArtifactKind,
    DomainExists,
    DomainNotFound,
    InvalidDomainName,
    NothingToRollback,
    PreconditionFailed,
    VersionNotFound,
)
from storage.registry import HISTORY_LIMIT


@pytest.fixture
def payload(tmp_path):
    path = tmp_path / "payload.bin"
    path.write_bytes(b"weights or vectors")
    return path


@pytest.fixture
def law(registry):
    registry.create_domain("law", description="contracts", settings={"top_k": 5})
    return "law"


def _publish(registry, payload, kind, domain="law", **metadata):
    return registry.publish(domain, kind, {"data.bin": payload}, metadata).version


def _stack(registry, payload, domain="law"):
    """passages <- index <- adapter, linked through manifest metadata as the producers record them."""
    passages = _publish(registry, payload, ArtifactKind.PASSAGES, domain)
    index = _publish(registry, payload, ArtifactKind.INDEXES, domain, passages_version=passages)
    adapter = _publish(registry, payload, ArtifactKind.ADAPTERS, domain, index_version=index)
    return passages, index, adapter


def test_domains_are_created_once_listed_and_read_back(registry):
    created = registry.create_domain("law", description="contracts", settings={"top_k": 5})
    registry.create_domain("med")

    with pytest.raises(DomainExists) as caught:
        registry.create_domain("law")

    assert caught.value.code == "domain_exists"
    assert registry.get_domain("law") == created
    assert registry.get_domain("law").settings == {"top_k": 5}
    assert [domain.name for domain in registry.list_domains()] == ["law", "med"]
    with pytest.raises(DomainNotFound):
        registry.get_domain("tax")


@pytest.mark.parametrize("name", ["", "Law", "-law", "la w", "../law", "a" * 64, "law/x", "law\n", "law\n\n"])
def test_invalid_domain_names_are_refused(registry, name):
    with pytest.raises(InvalidDomainName):
        registry.create_domain(name)
    assert registry.list_domains() == []


def test_key_layout_is_the_documented_one(registry, law, payload):
    passages, index, adapter = _stack(registry, payload)
    registry.promote(law, adapter)

    keys = {info.key for info in registry.store.list("domains/")}

    assert keys == {
        "domains/law/domain.json",
        "domains/law/live.json",
        f"domains/law/passages/{passages}/data.bin",
        f"domains/law/passages/{passages}/manifest.json",
        f"domains/law/indexes/{index}/data.bin",
        f"domains/law/indexes/{index}/manifest.json",
        f"domains/law/adapters/{adapter}/data.bin",
        f"domains/law/adapters/{adapter}/manifest.json",
    }


def test_live_pointer_starts_empty_and_unknown_domains_are_not_found(registry, law):
    pointer = registry.live(law)

    assert (pointer.adapter_version, pointer.index_version, pointer.passages_version) == (None, None, None)
    assert pointer.etag is None and pointer.history == []
    with pytest.raises(DomainNotFound):
        registry.live("tax")


def test_promote_follows_adapter_and_index_metadata(registry, law, payload):
    passages, index, adapter = _stack(registry, payload)

    pointer = registry.promote(law, adapter)

    assert (pointer.adapter_version, pointer.index_version, pointer.passages_version) == (
        adapter,
        index,
        passages,
    )
    reread = registry.live(law)
    assert reread == pointer and reread.etag == pointer.etag
    assert "etag" not in registry.store.get_bytes("domains/law/live.json").decode()


def test_promote_refuses_versions_that_do_not_exist(registry, law, payload):
    _, index, adapter = _stack(registry, payload)

    with pytest.raises(VersionNotFound) as caught:
        registry.promote(law, "20990101T000000Z-abcdef")
    assert caught.value.code == "version_not_found"
    with pytest.raises(VersionNotFound):
        registry.promote(law, adapter, index_version="20990101T000000Z-abcdef")
    with pytest.raises(VersionNotFound):
        registry.promote(law, index)  # an index version is not an adapter version
    with pytest.raises(VersionNotFound):
        registry.promote(law, adapter + "\n")  # an id is matched whole, a trailing newline included
    with pytest.raises(DomainNotFound):
        registry.promote("nosuch", adapter)  # the domain is what is missing, not the version
    assert registry.live(law).adapter_version is None


def test_set_live_changes_only_the_given_kinds_and_records_history(registry, law, payload):
    passages, index, adapter = _stack(registry, payload)
    registry.promote(law, adapter)
    new_index = _publish(registry, payload, ArtifactKind.INDEXES)

    pointer = registry.set_live(law, index_version=new_index, expected_etag=registry.live(law).etag)

    assert (pointer.adapter_version, pointer.index_version, pointer.passages_version) == (
        adapter,
        new_index,
        passages,
    )
    assert [(state.adapter_version, state.index_version) for state in pointer.history] == [(adapter, index)]


def test_rollback_restores_the_previous_state_step_by_step(registry, law, payload):
    _, _, first = _stack(registry, payload)
    _, _, second = _stack(registry, payload)
    registry.promote(law, first)
    registry.promote(law, second)

    assert registry.rollback(law).adapter_version == first
    assert registry.live(law).adapter_version == first
    with pytest.raises(NothingToRollback) as caught:
        registry.rollback(law)
    assert caught.value.code == "nothing_to_rollback"
    assert registry.live(law).adapter_version == first


def test_stale_expected_etag_is_a_version_conflict(registry, law, payload):
    _, _, first = _stack(registry, payload)
    _, _, second = _stack(registry, payload)
    seen = registry.promote(law, first)
    registry.promote(law, second, expected_etag=seen.etag)

    with pytest.raises(PreconditionFailed) as caught:
        registry.promote(law, first, expected_etag=seen.etag)

    assert caught.value.code == "version_conflict"
    assert registry.live(law).adapter_version == second


def _race(calls):
    """Run the calls at the same instant on threads; return (results, conflicts)."""
    barrier = threading.Barrier(len(calls))
    won, lost = [], []

    def run(call):
        barrier.wait()
        try:
            won.append(call())
        except PreconditionFailed as exc:
            lost.append(exc)

    threads = [threading.Thread(target=run, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return won, lost


def test_concurrent_promotions_from_threads_exactly_one_wins(registry, law, payload):
    adapters = [_stack(registry, payload)[2] for _ in range(5)]
    etag = registry.promote(law, adapters[0]).etag

    won, lost = _race(
        [lambda v=version: registry.promote(law, v, expected_etag=etag) for version in adapters[1:]]
    )

    assert len(won) == 1 and len(lost) == 3
    assert all(exc.code == "version_conflict" for exc in lost)
    live = registry.live(law)
    assert live.adapter_version == won[0].adapter_version
    assert [state.adapter_version for state in live.history] == [adapters[0]]


def test_concurrent_first_set_live_creates_the_pointer_once(registry, law, payload):
    indexes = [_publish(registry, payload, ArtifactKind.INDEXES) for _ in range(4)]

    won, lost = _race(
        [lambda v=version: registry.set_live(law, index_version=v, expected_etag=None) for version in indexes]
    )

    assert len(won) == 1 and len(lost) == 3
    assert registry.live(law).index_version == won[0].index_version
    with pytest.raises(PreconditionFailed, match="expected none"):
        registry.set_live(law, index_version=indexes[0], expected_etag=None)


def test_history_is_bounded(registry, law, payload):
    first = _publish(registry, payload, ArtifactKind.INDEXES)
    second = _publish(registry, payload, ArtifactKind.INDEXES)

    pointer = registry.live(law)
    for step in range(HISTORY_LIMIT + 3):
        pointer = registry.set_live(
            law, index_version=first if step % 2 == 0 else second, expected_etag=pointer.etag
        )

    assert len(pointer.history) == HISTORY_LIMIT
    assert pointer.history[-1].index_version == (second if pointer.index_version == first else first)


def test_gc_keeps_recent_live_and_pinned_versions(registry, law, payload):
    adapters = [_publish(registry, payload, ArtifactKind.ADAPTERS) for _ in range(5)]
    indexes = [_publish(registry, payload, ArtifactKind.INDEXES) for _ in range(4)]
    registry.set_live(law, adapter_version=adapters[0], index_version=indexes[0], expected_etag=None)
    registry.pin(law, adapters[1])

    deleted = registry.gc(law, keep_last=2)

    assert sorted(deleted) == sorted([f"adapters/{adapters[2]}", f"indexes/{indexes[1]}"])
    remaining = [manifest.version for manifest in registry.list_versions(law, ArtifactKind.ADAPTERS)]
    assert remaining == [adapters[0], adapters[1], adapters[3], adapters[4]]
    assert [m.version for m in registry.list_versions(law, ArtifactKind.INDEXES)] == [
        indexes[0],
        *indexes[2:],
    ]
    assert list(registry.store.list(f"domains/law/adapters/{adapters[2]}/")) == []

    registry.unpin(law, adapters[1])
    assert registry.gc(law, keep_last=2) == [f"adapters/{adapters[1]}"]
    assert registry.gc(law, keep_last=2) == []


def test_gc_keeps_what_kept_versions_need_and_a_dry_run_deletes_nothing(registry, law, payload):
    passages = [_publish(registry, payload, ArtifactKind.PASSAGES) for _ in range(3)]
    indexes = [
        registry.publish(
            law, ArtifactKind.INDEXES, {"x.bin": payload}, {"passages_version": passages[0]}
        ).version
    ]
    indexes += [_publish(registry, payload, ArtifactKind.INDEXES) for _ in range(2)]
    adapters = [
        registry.publish(
            law, ArtifactKind.ADAPTERS, {"x.bin": payload}, {"index_version": indexes[0]}
        ).version
    ]
    adapters += [_publish(registry, payload, ArtifactKind.ADAPTERS) for _ in range(2)]
    protected = _publish(registry, payload, ArtifactKind.ADAPTERS)
    adapters.append(_publish(registry, payload, ArtifactKind.ADAPTERS))
    registry.promote(law, adapters[0])  # its index, and that index's passages, are live now
    registry.set_live(law, index_version=indexes[2], expected_etag=registry.live(law).etag)

    planned = registry.gc(law, keep_last=1, protect=[protected], dry_run=True)
    assert sorted(planned) == sorted(
        [
            f"adapters/{adapters[1]}",
            f"adapters/{adapters[2]}",
            f"indexes/{indexes[1]}",
            f"passages/{passages[1]}",
        ]
    )
    assert len(registry.list_versions(law, ArtifactKind.ADAPTERS)) == 5  # a dry run deletes nothing
    assert registry.gc(law, keep_last=1, protect=[protected]) == planned
    assert [m.version for m in registry.list_versions(law, ArtifactKind.ADAPTERS)] == [
        adapters[0],
        protected,
        adapters[3],
    ]
    assert [m.version for m in registry.list_versions(law, ArtifactKind.INDEXES)] == [indexes[0], indexes[2]]
    registry.rollback(law)  # back to adapters[0] with the index it names: both still there
    assert registry.live(law).index_version == indexes[0]


def test_rollback_to_a_collected_version_says_so(registry, law, payload):
    old = _publish(registry, payload, ArtifactKind.ADAPTERS)
    registry.promote(law, old)
    new = _publish(registry, payload, ArtifactKind.ADAPTERS)
    registry.promote(law, new)

    assert registry.gc(law, keep_last=0) == [f"adapters/{old}"]

    with pytest.raises(VersionNotFound) as caught:
        registry.rollback(law)
    assert old in str(caught.value) and "deleted" in str(caught.value)
    assert registry.live(law).adapter_version == new


def test_pin_needs_an_existing_version_and_is_idempotent(registry, law, payload):
    version = _publish(registry, payload, ArtifactKind.PASSAGES)

    with pytest.raises(VersionNotFound):
        registry.pin(law, "20990101T000000Z-abcdef")
    registry.pin(law, version)
    pointer = registry.pin(law, version)

    assert pointer.pinned == [version]
    assert registry.unpin(law, version).pinned == []
    assert registry.unpin(law, version).pinned == []


def test_publish_needs_an_existing_domain(registry, payload):
    with pytest.raises(DomainNotFound):
        registry.publish("ghost", ArtifactKind.INDEXES, {"data.bin": payload})
    assert list(registry.store.list("")) == []

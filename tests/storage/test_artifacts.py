"""Versioned artifacts: manifest last, only complete versions visible, checksums verified on download."""

from __future__ import annotations

import hashlib
import os
from datetime import UTC, datetime, timedelta

import pytest

from storage import IntegrityError, InvalidKey, VersionNotFound, artifacts
from storage.artifacts import VERSION_ID, new_version_id

PREFIX = "domains/law/indexes"


@pytest.fixture
def source(tmp_path):
    """A small artifact directory with a nested file."""
    root = tmp_path / "source"
    (root / "shards").mkdir(parents=True)
    (root / "index.faiss").write_bytes(os.urandom(3000))
    (root / "config.json").write_text('{"factory": "Flat", "dim": 8}')
    (root / "shards" / "0.bin").write_bytes(os.urandom(500))
    return root


def _tree(root):
    return {
        path.relative_to(root).as_posix(): path.read_bytes() for path in root.rglob("*") if path.is_file()
    }


def test_version_ids_sort_by_time():
    early = new_version_id(datetime(2026, 11, 21, 21, 15, 0, tzinfo=UTC))
    late = new_version_id(datetime(2026, 11, 21, 21, 15, 1, tzinfo=UTC))

    assert early.startswith("20261121T211500Z-") and VERSION_ID.fullmatch(early)
    assert early < late


def test_publish_directory_then_download_round_trips(store, source, tmp_path):
    seen = []
    manifest = artifacts.publish(
        store, PREFIX, source, {"factory": "Flat"}, progress=lambda rel, size: seen.append(rel)
    )

    assert sorted(manifest.files) == ["config.json", "index.faiss", "shards/0.bin"]
    assert sorted(seen) == sorted(manifest.files)
    for relpath, entry in manifest.files.items():
        content = (source / relpath).read_bytes()
        assert (entry.sha256, entry.size) == (hashlib.sha256(content).hexdigest(), len(content))
    assert store.exists(f"{PREFIX}/{manifest.version}/manifest.json")
    assert artifacts.read_manifest(store, PREFIX, manifest.version) == manifest

    got = artifacts.download(store, PREFIX, manifest.version, tmp_path / "copy")

    assert got == manifest
    assert _tree(tmp_path / "copy") == _tree(source)


def test_publish_from_a_file_mapping(store, source):
    manifest = artifacts.publish(
        store, PREFIX, {"a/index.faiss": source / "index.faiss", "b.json": source / "config.json"}, {}
    )

    assert sorted(manifest.files) == ["a/index.faiss", "b.json"]
    assert (
        store.get_bytes(f"{PREFIX}/{manifest.version}/a/index.faiss") == (source / "index.faiss").read_bytes()
    )


def test_only_versions_with_a_manifest_are_listed_oldest_first(store, source):
    first = artifacts.publish(store, PREFIX, source, {"n": 1})
    second = artifacts.publish(store, PREFIX, source, {"n": 2})
    orphan = new_version_id()
    store.put_bytes(f"{PREFIX}/{orphan}/index.faiss", b"half an upload")

    listed = artifacts.list_versions(store, PREFIX)

    assert [manifest.version for manifest in listed] == [first.version, second.version]
    assert [manifest.metadata["n"] for manifest in listed] == [1, 2]
    with pytest.raises(VersionNotFound):
        artifacts.read_manifest(store, PREFIX, orphan)


def test_tampered_file_fails_download_and_leaves_nothing(store, source, tmp_path):
    manifest = artifacts.publish(store, PREFIX, source, {})
    store.put_bytes(f"{PREFIX}/{manifest.version}/shards/0.bin", b"corrupted behind the manifest's back")
    dest = tmp_path / "downloads" / "v"

    with pytest.raises(IntegrityError) as caught:
        artifacts.download(store, PREFIX, manifest.version, dest)

    assert caught.value.code == "checksum_mismatch"
    assert "shards/0.bin" in str(caught.value)
    assert list((tmp_path / "downloads").iterdir()) == []


def test_download_refuses_a_non_empty_destination(store, source, tmp_path):
    manifest = artifacts.publish(store, PREFIX, source, {})
    dest = tmp_path / "busy"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")

    with pytest.raises(FileExistsError):
        artifacts.download(store, PREFIX, manifest.version, dest)

    assert [path.name for path in dest.iterdir()] == ["keep.txt"]


def test_failed_publish_leaves_no_visible_version_and_removes_its_files(store, source):
    def fail_after_first(relpath, size):
        raise RuntimeError("producer gave up")

    with pytest.raises(RuntimeError):
        artifacts.publish(store, PREFIX, source, {}, progress=fail_after_first)

    assert artifacts.list_versions(store, PREFIX) == []
    assert list(store.list(f"{PREFIX}/")) == []


def test_delete_version_removes_manifest_and_files(store, source):
    keep = artifacts.publish(store, PREFIX, source, {})
    gone = artifacts.publish(store, PREFIX, source, {})

    artifacts.delete_version(store, PREFIX, gone.version)
    artifacts.delete_version(store, PREFIX, gone.version)

    assert [manifest.version for manifest in artifacts.list_versions(store, PREFIX)] == [keep.version]
    assert list(store.list(f"{PREFIX}/{gone.version}/")) == []


def test_incomplete_versions_are_swept_only_once_old_enough(store, source):
    complete = artifacts.publish(store, PREFIX, source, {})
    orphan = new_version_id()
    store.put_bytes(f"{PREFIX}/{orphan}/index.faiss", b"abandoned upload")

    assert artifacts.delete_incomplete(store, PREFIX, older_than=timedelta(hours=1)) == []
    assert store.exists(f"{PREFIX}/{orphan}/index.faiss")
    assert artifacts.delete_incomplete(store, PREFIX, older_than=timedelta(0)) == [orphan]
    assert list(store.list(f"{PREFIX}/{orphan}/")) == []
    assert [manifest.version for manifest in artifacts.list_versions(store, PREFIX)] == [complete.version]


@pytest.mark.parametrize("relpath", ["manifest.json", "../outside", "/abs"])
def test_publish_refuses_reserved_or_escaping_paths(store, source, relpath):
    with pytest.raises(InvalidKey):
        artifacts.publish(store, PREFIX, {relpath: source / "config.json"}, {})
    assert list(store.list("")) == []


def test_unknown_or_malformed_version_is_not_found(store):
    with pytest.raises(VersionNotFound):
        artifacts.read_manifest(store, PREFIX, new_version_id())
    with pytest.raises(VersionNotFound):
        artifacts.read_manifest(store, PREFIX, "../../etc")

"""The ObjectStore contract, identical for the local directory and S3."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest

from storage import (
    InvalidKey,
    LocalStore,
    ObjectNotFound,
    PreconditionFailed,
    S3Store,
    StoreConfig,
    StoreUnavailable,
    open_store,
)


def test_put_then_get_stat_and_read_agree(store):
    written = store.put_bytes("docs/a.txt", b"hello world")

    assert store.get_bytes("docs/a.txt") == b"hello world"
    assert written.etag == hashlib.md5(b"hello world").hexdigest()
    stat = store.stat("docs/a.txt")
    assert (stat.key, stat.size, stat.etag) == ("docs/a.txt", 11, written.etag)
    data, info = store.read("docs/a.txt")
    assert data == b"hello world" and info.etag == written.etag
    assert store.exists("docs/a.txt") and not store.exists("docs/b.txt")


def test_overwrite_replaces_content_and_etag(store):
    first = store.put_bytes("k", b"one")
    second = store.put_bytes("k", b"two!")

    assert store.get_bytes("k") == b"two!"
    assert second.etag != first.etag and store.stat("k").etag == second.etag


def test_ranged_get(store):
    store.put_bytes("r", bytes(range(100)))

    assert store.get_bytes("r", offset=10, length=5) == bytes(range(10, 15))
    assert store.get_bytes("r", offset=95) == bytes(range(95, 100))
    assert store.get_bytes("r", offset=98, length=10) == bytes([98, 99])
    assert store.get_bytes("r", offset=100) == b""
    assert store.get_bytes("r", offset=3, length=0) == b""
    with pytest.raises(ValueError):
        store.get_bytes("r", offset=-1)


def test_missing_object_raises_object_not_found_everywhere(store, tmp_path):
    for read in (
        lambda: store.get_bytes("nope"),
        lambda: store.get_bytes("nope", offset=0, length=0),
        lambda: store.read("nope"),
        lambda: store.stat("nope"),
        lambda: store.iter_chunks("nope"),
        lambda: store.get_file("nope", tmp_path / "out"),
    ):
        with pytest.raises(ObjectNotFound) as caught:
            read()
        assert caught.value.code == "object_not_found"
    assert not (tmp_path / "out").exists()


def test_big_file_round_trip_streams_and_reports_the_stored_etag(store, tmp_path):
    source = tmp_path / "big.bin"
    payload = os.urandom(6 * 1024 * 1024 + 123)  # over the 5 MiB multipart threshold on S3
    source.write_bytes(payload)

    put = store.put_file("blobs/big.bin", source)

    assert put.size == len(payload)
    assert put.etag == store.stat("blobs/big.bin").etag
    if isinstance(store, S3Store):
        assert put.etag.endswith("-2")  # two parts: the ETag of a multipart upload is not the MD5
    else:
        assert put.etag == hashlib.md5(payload).hexdigest()
    target = tmp_path / "down" / "big.bin"
    got = store.get_file("blobs/big.bin", target)
    assert target.read_bytes() == payload
    assert (got.size, got.etag) == (len(payload), put.etag)
    chunks = list(store.iter_chunks("blobs/big.bin", chunk_size=1 << 20))
    assert b"".join(chunks) == payload and max(len(chunk) for chunk in chunks) <= 1 << 20
    assert (
        store.get_bytes("blobs/big.bin", offset=5 * 1024 * 1024, length=7) == payload[5 * 1024 * 1024 :][:7]
    )


def test_get_file_replaces_the_destination_atomically(store, tmp_path):
    store.put_bytes("f", b"new content")
    target = tmp_path / "downloads" / "out.txt"
    target.parent.mkdir()
    target.write_bytes(b"old")

    store.get_file("f", target)

    assert target.read_bytes() == b"new content"
    assert [path.name for path in target.parent.iterdir()] == ["out.txt"]  # no temp file left behind


def test_list_is_recursive_sorted_and_prefix_exact(store):
    keys = ["a/y/z", "a/y-1", "a/y0", "a/x", "a/y.txt/q", "ab", "b/c"]
    for key in keys:
        store.put_bytes(key, key.encode())

    assert [info.key for info in store.list("a/")] == sorted(k for k in keys if k.startswith("a/"))
    assert [info.key for info in store.list("a/y")] == ["a/y-1", "a/y.txt/q", "a/y/z", "a/y0"]
    assert [info.key for info in store.list("")] == sorted(keys)
    assert list(store.list("zzz/")) == []
    listed = {info.key: info for info in store.list("a/x")}
    assert listed["a/x"].size == 3 and listed["a/x"].etag == store.stat("a/x").etag


def test_delete_is_idempotent(store):
    store.put_bytes("d/one", b"1")
    store.put_bytes("d/two", b"2")

    store.delete("d/one")
    store.delete("d/one")
    store.delete("never/existed")

    assert [info.key for info in store.list("d/")] == ["d/two"]
    with pytest.raises(ObjectNotFound):
        store.get_bytes("d/one")


def test_if_none_match_creates_only_once(store):
    store.put_bytes("lock", b"first", if_none_match=True)

    with pytest.raises(PreconditionFailed) as caught:
        store.put_bytes("lock", b"second", if_none_match=True)

    assert caught.value.code == "version_conflict"
    assert store.get_bytes("lock") == b"first"


def test_if_match_accepts_the_current_etag_and_refuses_a_stale_one(store):
    first = store.put_bytes("ptr", b"v1")
    second = store.put_bytes("ptr", b"v2", if_match=first.etag)

    with pytest.raises(PreconditionFailed):
        store.put_bytes("ptr", b"v3", if_match=first.etag)
    assert store.get_bytes("ptr") == b"v2"
    store.put_bytes("ptr", b"v3", if_match=f'"{second.etag}"')  # quoted, as HTTP carries it
    assert store.get_bytes("ptr") == b"v3"
    with pytest.raises(PreconditionFailed):
        store.put_bytes("absent", b"x", if_match=first.etag)
    assert not store.exists("absent")
    with pytest.raises(ValueError):
        store.put_bytes("ptr", b"x", if_match=second.etag, if_none_match=True)


def test_concurrent_conditional_writers_from_threads_exactly_one_wins(store):
    base = store.put_bytes("counter", b"0")
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def writer(n: int) -> None:
        barrier.wait()
        try:
            store.put_bytes("counter", f"writer {n}".encode(), if_match=base.etag)
            outcomes.append(f"writer {n}")
        except PreconditionFailed:
            outcomes.append("conflict")

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    winners = [outcome for outcome in outcomes if outcome != "conflict"]
    assert len(winners) == 1 and outcomes.count("conflict") == 7
    assert store.get_bytes("counter") == winners[0].encode()


@pytest.mark.parametrize("key", ["", "/abs", "../escape", "a/../../b", "a//b", "a/./b", "dir/", "a\\b"])
def test_keys_that_could_escape_or_are_malformed_are_refused(store, key):
    with pytest.raises(InvalidKey) as caught:
        store.put_bytes(key, b"x")
    assert caught.value.code == "invalid_key"


def test_listing_prefix_cannot_escape(store):
    with pytest.raises(InvalidKey):
        list(store.list("../"))


def test_ping_and_describe(store, tmp_path):
    store.ping()
    if isinstance(store, LocalStore):
        assert store.describe() == f"local:{tmp_path / 'store'}"
        assert store.name() == "local"  # what clients see: no server path
        with pytest.raises(ObjectNotFound) as caught:
            store.get_bytes("missing")
        assert str(tmp_path) not in str(caught.value)
    else:
        assert store.describe().startswith("s3://test-") and store.name() == store.describe()


def test_local_store_recomputes_the_etag_of_a_file_changed_behind_its_back(tmp_path):
    store = LocalStore(tmp_path / "store")
    old = store.put_bytes("x", b"original")
    (tmp_path / "store" / "objects" / "x").write_bytes(b"tampered")

    assert store.stat("x").etag == hashlib.md5(b"tampered").hexdigest()
    with pytest.raises(PreconditionFailed):
        store.put_bytes("x", b"new", if_match=old.etag)


def test_local_store_refuses_an_object_where_a_prefix_exists(tmp_path):
    store = LocalStore(tmp_path / "store")
    store.put_bytes("a/b", b"1")

    with pytest.raises(InvalidKey):
        store.put_bytes("a", b"2")
    assert store.get_bytes("a/b") == b"1"


def test_open_store_builds_the_configured_backend(tmp_path, s3_server):
    local = open_store(StoreConfig(backend="local", root=tmp_path / "s"))
    remote = open_store(s3_server.store_config(bucket="open-store"))

    assert isinstance(local, LocalStore) and isinstance(remote, S3Store)
    remote.put_bytes("x", b"1")
    assert remote.get_bytes("x") == b"1"


def test_store_config_checks_fields_across_backends():
    with pytest.raises(ValueError, match="root"):
        StoreConfig(backend="local")
    with pytest.raises(ValueError, match="endpoint"):
        StoreConfig(backend="s3", access_key="a", secret_key="b")
    with pytest.raises(ValueError, match="contradicts"):
        StoreConfig(backend="s3", endpoint="https://minio:9000", secure=False, access_key="a", secret_key="b")
    with pytest.raises(ValueError, match="bucket"):
        StoreConfig(backend="s3", endpoint="minio:9000", bucket="Bad_Bucket", access_key="a", secret_key="b")
    config = StoreConfig(backend="s3", endpoint="https://minio:9000", access_key="a", secret_key="b")
    assert config.secure is True
    assert "b" not in repr(config.secret_key)
    assert S3Store(config).describe() == "s3://ragadapt@minio:9000 (tls)"


def test_local_store_on_an_unwritable_root_is_unavailable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")

    with pytest.raises(StoreUnavailable):
        LocalStore(blocker / "store")

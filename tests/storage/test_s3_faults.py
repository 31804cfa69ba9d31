"""What users see when the S3 server crashes, restarts, is unreachable or rejects our credentials.

These tests crash and restart a SeaweedFS server of their own, so the session's server stays untouched.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

import pytest

from storage import (
    ArtifactKind,
    DomainRegistry,
    S3Store,
    StoreAuthError,
    StoreConfig,
    StoreUnavailable,
)
from tests.s3server import SeaweedS3, free_ports


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with SeaweedS3(tmp_path_factory.mktemp("s3faults")) as server:
        yield server


@pytest.fixture
def running(server):
    """The module's server, started again if a previous test left it down."""
    server.start()
    return server


def _version_dir(root, n_files):
    root.mkdir(parents=True)
    for n in range(n_files):
        (root / f"part-{n}.bin").write_bytes(os.urandom(2048))
    return root


def test_crash_mid_publish_leaves_live_version_intact(running, tmp_path):
    registry = DomainRegistry(S3Store(running.store_config()))
    registry.create_domain("law")
    good = registry.publish("law", ArtifactKind.ADAPTERS, _version_dir(tmp_path / "good", 2))
    registry.promote("law", good.version)

    def crash_after_first_file(relpath, size):
        running.kill()

    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as caught:
        registry.publish(
            "law", ArtifactKind.ADAPTERS, _version_dir(tmp_path / "new", 3), progress=crash_after_first_file
        )

    assert time.monotonic() - started < 15
    assert caught.value.code == "store_unavailable" and running.endpoint in str(caught.value)

    running.start()
    assert [m.version for m in registry.list_versions("law", ArtifactKind.ADAPTERS)] == [good.version]
    assert registry.live("law").adapter_version == good.version
    registry.download("law", ArtifactKind.ADAPTERS, good.version, tmp_path / "restored")
    assert sorted(p.name for p in (tmp_path / "restored").iterdir()) == ["part-0.bin", "part-1.bin"]
    swept = registry.gc("law", keep_last=5, incomplete_older_than=timedelta(0))
    assert len(swept) == 1 and swept[0].startswith("adapters/") and good.version not in swept[0]


def test_data_survives_a_restart(running):
    store = S3Store(running.store_config())
    written = store.put_bytes("domains/law/live.json", b'{"adapter_version": "x"}')

    running.restart()

    assert store.get_bytes("domains/law/live.json") == b'{"adapter_version": "x"}'
    assert store.stat("domains/law/live.json").etag == written.etag
    store.put_bytes("domains/law/live.json", b"{}", if_match=written.etag)


def test_stopped_server_fails_fast_then_recovers_with_the_same_store(running):
    store = S3Store(running.store_config())
    store.put_bytes("k", b"v")
    running.stop()

    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        store.get_bytes("k")
    with pytest.raises(StoreUnavailable):
        store.ping()

    assert time.monotonic() - started < 10
    running.start()
    assert store.get_bytes("k") == b"v"


def test_nothing_listening_is_unavailable_within_seconds():
    (port,) = free_ports(1)
    store = S3Store(StoreConfig(backend="s3", endpoint=f"127.0.0.1:{port}", access_key="a", secret_key="b"))

    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as caught:
        store.ping()

    assert time.monotonic() - started < 5
    assert f"127.0.0.1:{port}" in str(caught.value) and caught.value.status == 503


@pytest.mark.parametrize("overrides", [{"secret_key": "wrong-secret"}, {"access_key": "nobody"}])
def test_wrong_credentials_are_an_auth_error_not_a_missing_object(running, overrides):
    store = S3Store(running.store_config(**overrides))

    with pytest.raises(StoreAuthError) as caught:
        store.ping()
    with pytest.raises(StoreAuthError):
        store.put_bytes("k", b"v")

    assert caught.value.code == "store_auth_failed"
    assert store.describe() in str(caught.value) and "secret key" in str(caught.value)

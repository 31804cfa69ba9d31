"""Fixtures of the service tests: tiny-backbone settings over a local or an S3 store, a direct pipeline."""

from __future__ import annotations

import pytest

from service.settings import Settings, StoreSettings
from storage import ObjectStore, open_store
from tests.service.support import ADMIN_TOKEN, Direct


@pytest.fixture(params=["local", "s3"])
def store_settings(request, tmp_path) -> StoreSettings:
    """The store the server uses: a local directory, or a fresh bucket on the session's SeaweedFS server."""
    if request.param == "local":
        return StoreSettings(backend="local", root=tmp_path / "store")
    config = request.getfixturevalue("s3_server").store_config()
    return StoreSettings(
        backend="s3",
        endpoint=config.endpoint,
        bucket=config.bucket,
        access_key=config.access_key,
        secret_key=config.secret_key.get_secret_value(),
        secure=False,
    )


@pytest.fixture
def local_store_settings(tmp_path) -> StoreSettings:
    return StoreSettings(backend="local", root=tmp_path / "store")


@pytest.fixture
def make_settings(tmp_path, tiny_backbone_settings):
    """Settings for a test server on the tiny backbone; keyword groups override the defaults (no run workers:
    they are separate processes that load a backbone each)."""

    def make(store: StoreSettings, **groups) -> Settings:
        server = {
            "port": 0,
            "admin_token": ADMIN_TOKEN,
            "batch_wait_ms": 20,
            "poll_interval_s": 0.5,
            **groups.pop("server", {}),
        }
        return Settings(
            data_dir=tmp_path / "data",
            server=server,
            store=store,
            backbone=tiny_backbone_settings,
            demo=groups.pop("demo", {"enabled": False}),
            runs=groups.pop("runs", {"max_concurrent": 0}),
            **groups,
        )

    return make


@pytest.fixture
def store_of():
    def store(settings: Settings) -> ObjectStore:
        return open_store(settings.store_config)

    return store


@pytest.fixture
def direct(direct_backbone, tmp_path):
    def make(store: ObjectStore) -> Direct:
        return Direct(direct_backbone, store, tmp_path / "direct")

    return make

"""Every storage contract test runs against both backends: the local directory and a real S3 server."""

from __future__ import annotations

import pytest

from storage import DomainRegistry, LocalStore, ObjectStore, S3Store


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> ObjectStore:
    """An empty store: a fresh directory, or a fresh bucket on the session's SeaweedFS server."""
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return S3Store(request.getfixturevalue("s3_server").store_config())


@pytest.fixture
def registry(store) -> DomainRegistry:
    return DomainRegistry(store)

"""The artifact store (local directory or S3), versioned artifacts, and the per-domain registry."""

from storage.artifacts import FileEntry, Manifest, new_version_id
from storage.errors import (
    IntegrityError,
    InvalidKey,
    ObjectNotFound,
    PreconditionFailed,
    StoreAuthError,
    StoreError,
    StoreUnavailable,
    VersionNotFound,
)
from storage.store import LocalStore, ObjectInfo, ObjectStore, S3Store, StoreConfig, open_store

__all__ = [
    "FileEntry",
    "IntegrityError",
    "InvalidKey",
    "LocalStore",
    "Manifest",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectStore",
    "PreconditionFailed",
    "S3Store",
    "StoreAuthError",
    "StoreConfig",
    "StoreError",
    "StoreUnavailable",
    "VersionNotFound",
    "new_version_id",
    "open_store",
]

"""The artifact store (local directory or S3), versioned artifacts, and the per-domain registry."""

from storage.errors import (
    InvalidKey,
    ObjectNotFound,
    PreconditionFailed,
    StoreAuthError,
    StoreError,
    StoreUnavailable,
)
from storage.store import LocalStore, ObjectInfo, ObjectStore, S3Store, StoreConfig, open_store

__all__ = [
    "InvalidKey",
    "LocalStore",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectStore",
    "PreconditionFailed",
    "S3Store",
    "StoreAuthError",
    "StoreConfig",
    "StoreError",
    "StoreUnavailable",
    "open_store",
]

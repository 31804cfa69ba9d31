"""The artifact store (local directory or S3), versioned artifacts, and the per-domain registry."""

from storage.artifacts import FileEntry, Manifest, new_version_id
from storage.errors import (
    DomainExists,
    DomainNotFound,
    IntegrityError,
    InvalidDomainName,
    InvalidKey,
    NothingToRollback,
    ObjectNotFound,
    PreconditionFailed,
    StoreAuthError,
    StoreError,
    StoreUnavailable,
    VersionNotFound,
)
from storage.registry import ArtifactKind, Domain, DomainRegistry, LivePointer, LiveState
from storage.store import LocalStore, ObjectInfo, ObjectStore, S3Store, StoreConfig, open_store

__all__ = [
    "ArtifactKind",
    "Domain",
    "DomainExists",
    "DomainNotFound",
    "DomainRegistry",
    "FileEntry",
    "IntegrityError",
    "InvalidDomainName",
    "InvalidKey",
    "LivePointer",
    "LiveState",
    "LocalStore",
    "Manifest",
    "NothingToRollback",
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

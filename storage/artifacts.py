"""Versioned artifacts: a directory of files stored under ``{prefix}/{version}/``, described by a manifest.

The manifest is written last and only if absent, so a version becomes visible all at once or not at all:
readers treat a version without ``manifest.json`` as not there. Deletion removes the manifest first for
the same reason. Downloads verify every file's SHA-256 and land in their destination by one rename.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from storage.errors import (
    IntegrityError,
    InvalidKey,
    ObjectNotFound,
    StoreError,
    VersionNotFound,
)
from storage.store import ObjectInfo, ObjectStore, check_key

MANIFEST = "manifest.json"
# Matched whole (fullmatch): `$` alone would also accept a trailing newline.
VERSION_ID = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{6}")
_CHUNK = 1 << 20


class FileEntry(BaseModel):
    """Checksum and size of one file of a version."""

    sha256: str
    size: int


class Manifest(BaseModel):
    """What a complete version holds: files by relative path, and free-form metadata from its producer."""

    version: str
    created_at: datetime
    files: dict[str, FileEntry]
    metadata: dict[str, Any] = Field(default_factory=dict)

    @property
    def checksum(self) -> str:
        """SHA-256 over the files' paths and checksums: what the version holds, in one value."""
        digest = hashlib.sha256()
        for relpath, entry in sorted(self.files.items()):
            digest.update(f"{relpath}\0{entry.sha256}\n".encode())
        return digest.hexdigest()


def new_version_id(now: datetime | None = None) -> str:
    """A version id that sorts by creation time to the second, e.g. ``20261121T211500Z-3f9a1c``."""
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    return f"{moment:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def publish(
    store: ObjectStore,
    prefix: str,
    files: Mapping[str, Path] | Path,
    metadata: Mapping[str, Any] | None = None,
    *,
    progress: Callable[[str, int], None] | None = None,
) -> Manifest:
    """Upload ``files`` (relative path -> local file, or a directory to walk) as a new version.

    ``progress(relpath, size)`` is called after each file is stored. If anything fails before the
    manifest is written, the uploaded files are removed when the store still answers; either way the
    version stays invisible.
    """
    check_key(prefix)
    sources = _sources(files)
    created_at = datetime.now(UTC)
    version = new_version_id(created_at)
    entries: dict[str, FileEntry] = {}
    uploaded: list[str] = []
    try:
        for relpath, path in sources:
            digest, size = _sha256_file(path)
            key = f"{prefix}/{version}/{relpath}"
            store.put_file(key, path)
            uploaded.append(key)
            entries[relpath] = FileEntry(sha256=digest, size=size)
            if progress is not None:
                progress(relpath, size)
        manifest = Manifest(
            version=version, created_at=created_at, files=entries, metadata=dict(metadata or {})
        )
        store.put_bytes(
            f"{prefix}/{version}/{MANIFEST}", manifest.model_dump_json(indent=2).encode(), if_none_match=True
        )
    except Exception:
        _discard(store, uploaded)
        raise
    return manifest


def read_manifest(store: ObjectStore, prefix: str, version: str) -> Manifest:
    """The manifest of a complete version; ``VersionNotFound`` if there is none."""
    key = f"{check_key(prefix)}/{_check_version(version)}/{MANIFEST}"
    try:
        data, _ = store.read(key)
    except ObjectNotFound as exc:
        raise VersionNotFound(f"no complete version {version!r} under {prefix!r}") from exc
    return _parse_manifest(data, key)


def list_versions(store: ObjectStore, prefix: str) -> list[Manifest]:
    """Manifests of every complete version under ``prefix``, oldest first."""
    manifests = []
    for version in sorted(_scan(store, prefix)):
        try:
            manifests.append(read_manifest(store, prefix, version))
        except VersionNotFound:
            continue  # incomplete, or deleted while we were listing
    manifests.sort(key=lambda manifest: (manifest.created_at, manifest.version))
    return manifests


def download(store: ObjectStore, prefix: str, version: str, dest_dir: Path) -> Manifest:
    """Fetch a complete version into ``dest_dir`` (which must not exist, or be empty), checking SHA-256s.

    Files are written into a temporary sibling directory that is renamed to ``dest_dir`` only once every
    checksum matched, so a failure (``IntegrityError``, store errors) leaves nothing behind.
    """
    manifest = read_manifest(store, prefix, version)
    dest = Path(dest_dir)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"download destination {dest} already exists and is not empty")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part"))
    try:
        for relpath, entry in sorted(manifest.files.items()):
            check_key(relpath)  # a manifest must not be able to write outside the destination
            key = f"{prefix}/{version}/{relpath}"
            target = staging / relpath
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            size = 0
            with open(target, "wb") as out:
                for chunk in store.iter_chunks(key):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if (digest.hexdigest(), size) != (entry.sha256, entry.size):
                raise IntegrityError(
                    f"{key}: manifest says sha256 {entry.sha256} ({entry.size} bytes), "
                    f"store returned sha256 {digest.hexdigest()} ({size} bytes)"
                )
        os.rename(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def delete_version(store: ObjectStore, prefix: str, version: str) -> None:
    """Delete a version: its manifest first (the version disappears at once), then its files. Idempotent."""
    base = f"{check_key(prefix)}/{_check_version(version)}"
    store.delete(f"{base}/{MANIFEST}")
    for info in store.list(f"{base}/"):
        store.delete(info.key)


def delete_incomplete(
    store: ObjectStore, prefix: str, *, older_than: timedelta, dry_run: bool = False
) -> list[str]:
    """Delete versions that never got a manifest (failed publishes) and saw no write for ``older_than``
    (``dry_run``: only list them).

    The age guard keeps a publish that is still uploading from being swept away under it.
    """
    cutoff = datetime.now(UTC) - older_than
    swept = []
    for version, objects in sorted(_scan(store, prefix).items()):
        if any(info.key.endswith(f"/{MANIFEST}") for info in objects):
            continue
        if max(info.last_modified for info in objects) >= cutoff:
            continue
        if not dry_run:
            for info in objects:
                store.delete(info.key)
        swept.append(version)
    return swept


def _scan(store: ObjectStore, prefix: str) -> dict[str, list[ObjectInfo]]:
    """Objects under ``prefix`` grouped by version id."""
    base = f"{check_key(prefix)}/"
    versions: dict[str, list[ObjectInfo]] = defaultdict(list)
    for info in store.list(base):
        version = info.key[len(base) :].partition("/")[0]
        if VERSION_ID.fullmatch(version):
            versions[version].append(info)
    return versions


def _check_version(version: str) -> str:
    if not isinstance(version, str) or not VERSION_ID.fullmatch(version):
        raise VersionNotFound(f"{version!r} is not a version id (expected e.g. 20261121T211500Z-3f9a1c)")
    return version


def _parse_manifest(data: bytes, key: str) -> Manifest:
    try:
        return Manifest.model_validate_json(data)
    except ValidationError as exc:
        raise IntegrityError(f"manifest {key} is unreadable: {exc}") from exc


def _sources(files: Mapping[str, Path] | Path) -> list[tuple[str, Path]]:
    """(relative path, local file) pairs to upload, sorted, with every relative path checked."""
    if isinstance(files, (str, os.PathLike)):
        root = Path(files)
        if not root.is_dir():
            raise NotADirectoryError(f"{root} is not a directory")
        pairs = [(path.relative_to(root).as_posix(), path) for path in root.rglob("*") if path.is_file()]
    else:
        pairs = [(relpath, Path(path)) for relpath, path in files.items()]
        for _, path in pairs:
            if not path.is_file():
                raise FileNotFoundError(f"{path} is not a file")
    for relpath, _ in pairs:
        check_key(relpath)
        if relpath == MANIFEST:
            raise InvalidKey(f"{MANIFEST!r} is reserved for the version's manifest")
    return sorted(pairs)


def _sha256_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as src:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _discard(store: ObjectStore, keys: list[str]) -> None:
    """Best-effort removal of a failed publish's files; stops at the first store error (orphans are
    invisible without a manifest, and ``delete_incomplete`` sweeps them later)."""
    for key in keys:
        try:
            store.delete(key)
        except StoreError:
            return

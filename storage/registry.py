"""Per-domain registry: domain records, versioned artifacts by kind, and the live pointer.

Key layout (indexing, adapters and the service rely on it exactly)::

    domains/<domain>/domain.json                 the domain record
    domains/<domain>/live.json                   the live pointer, changed only by conditional writes
    domains/<domain>/passages/<version>/...      passages versions (artifacts)
    domains/<domain>/indexes/<version>/...       index versions (artifacts)
    domains/<domain>/adapters/<version>/...      adapter versions (artifacts)

Every change to ``live.json`` is a compare-and-swap on its ETag, so of two concurrent promotions exactly one
lands and the other gets ``PreconditionFailed`` (``version_conflict``) instead of silently overwriting it.
``domain.json`` changes the same way (the job building the domain's index, deletion under way).

Deleting a domain marks its record first (from then on it is not found), removes the live pointer, then
every artifact, and the record last: an interrupted deletion is finished by deleting it again.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, Field, ValidationError

from storage import artifacts
from storage.artifacts import Manifest
from storage.errors import (
    DomainExists,
    DomainNotFound,
    IntegrityError,
    InvalidDomainName,
    NothingToRollback,
    ObjectNotFound,
    PreconditionFailed,
    VersionNotFound,
)
from storage.store import ObjectStore

# Matched whole (fullmatch): `$` alone would also accept a trailing newline.
DOMAIN_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
DOMAIN_PATTERN = f"^{DOMAIN_NAME.pattern}$"  # for JSON Schema and pydantic, whose `$` is the very end
HISTORY_LIMIT = 50
_Model = TypeVar("_Model", bound=BaseModel)


class ArtifactKind(StrEnum):
    """The kinds of versioned artifact a domain holds; the value is the key segment."""

    PASSAGES = "passages"
    INDEXES = "indexes"
    ADAPTERS = "adapters"


class Domain(BaseModel):
    """The record stored in ``domains/<name>/domain.json``. ``build_job``: the job that builds (or last built)
    the domain's index; ``deleting``: a deletion is under way (the domain is not found any more)."""

    name: str
    created_at: datetime
    description: str = ""
    settings: dict[str, Any] = Field(default_factory=dict)
    build_job: str | None = None
    deleting: bool = False
    etag: str | None = Field(default=None, exclude=True)


class LiveState(BaseModel):
    """Which versions serve a domain. ``None`` means nothing of that kind has been made live yet."""

    adapter_version: str | None = None
    index_version: str | None = None
    passages_version: str | None = None
    updated_at: datetime | None = None

    def versions(self) -> dict[ArtifactKind, str | None]:
        """The live version of each kind."""
        return {
            ArtifactKind.ADAPTERS: self.adapter_version,
            ArtifactKind.INDEXES: self.index_version,
            ArtifactKind.PASSAGES: self.passages_version,
        }


class LivePointer(LiveState):
    """The content of ``live.json``: the current state, earlier states (newest last), pinned versions.

    ``etag`` is the store ETag this pointer was read with; pass it back as ``expected_etag`` to make an
    update conditional on nobody having changed the pointer since. It is not part of the stored JSON.
    """

    history: list[LiveState] = Field(default_factory=list)
    pinned: list[str] = Field(default_factory=list)
    etag: str | None = Field(default=None, exclude=True)


class DomainRegistry:
    """Domains, their artifact versions and their live pointer, on top of any ``ObjectStore``."""

    def __init__(self, store: ObjectStore) -> None:
        self._store = store

    @property
    def store(self) -> ObjectStore:
        return self._store

    # -- domains ------------------------------------------------------------------------------------

    def create_domain(
        self,
        name: str,
        description: str = "",
        settings: Mapping[str, Any] | None = None,
        *,
        build_job: str | None = None,
    ) -> Domain:
        """Register a new domain; ``DomainExists`` if the name is taken (decided by a create-only write)."""
        _check_name(name)
        domain = Domain(
            name=name,
            created_at=datetime.now(UTC),
            description=description,
            settings=dict(settings or {}),
            build_job=build_job,
        )
        try:
            info = self._store.put_bytes(
                _domain_key(name), domain.model_dump_json(indent=2).encode(), if_none_match=True
            )
        except PreconditionFailed as exc:
            try:
                taken = self._read_domain(name)
            except DomainNotFound:  # deleted meanwhile
                raise DomainExists(f"domain {name!r} already exists") from exc
            if taken.deleting:
                raise DomainExists(f"domain {name!r} is being deleted; delete it again to finish") from exc
            raise DomainExists(f"domain {name!r} already exists") from exc
        return domain.model_copy(update={"etag": info.etag})

    def get_domain(self, name: str, *, deleting: bool = False) -> Domain:
        """The domain record; ``DomainNotFound`` if there is none or it is being deleted (unless
        ``deleting``)."""
        domain = self._read_domain(name)
        if domain.deleting and not deleting:
            raise DomainNotFound(f"domain {name!r} is being deleted")
        return domain

    def update_domain(self, name: str, change: Callable[[Domain], Domain | None]) -> Domain:
        """Compare-and-swap ``domain.json``: ``change`` gets the record read and returns the new one (None: no
        change). ``PreconditionFailed`` (``version_conflict``) if another writer changed it meanwhile."""
        current = self.get_domain(name)
        updated = change(current.model_copy(deep=True))
        if updated is None:
            return current
        try:
            info = self._store.put_bytes(
                _domain_key(name), updated.model_dump_json(indent=2).encode(), if_match=current.etag
            )
        except PreconditionFailed as exc:
            raise PreconditionFailed(
                f"domain {name!r} was changed by another writer; read it again and retry"
            ) from exc
        return updated.model_copy(update={"etag": info.etag})

    def delete_domain(self, name: str) -> None:
        """Delete a domain: mark it deleted (it is not found from then on), remove its live pointer, every
        artifact and record under it, and its record last. Deleting a domain whose deletion was interrupted
        finishes it; ``DomainNotFound`` once there is nothing left."""
        current = self._read_domain(name)
        if not current.deleting:
            marked = current.model_copy(update={"deleting": True})
            try:
                self._store.put_bytes(
                    _domain_key(name), marked.model_dump_json(indent=2).encode(), if_match=current.etag
                )
            except PreconditionFailed as exc:
                raise PreconditionFailed(
                    f"domain {name!r} was changed while it was being deleted; try again"
                ) from exc
        self._store.delete(_live_key(name))
        for kind in ArtifactKind:
            prefix = self.prefix(name, kind)
            for manifest in artifacts.list_versions(self._store, prefix):
                artifacts.delete_version(self._store, prefix, manifest.version)
        record = _domain_key(name)
        for info in list(self._store.list(f"domains/{name}/")):
            if info.key != record:
                self._store.delete(info.key)
        self._store.delete(record)

    def deleting_domains(self) -> list[str]:
        """Domains whose deletion was started but not finished (``gc`` finishes them)."""
        names = []
        for info in self._store.list("domains/"):
            parts = info.key.split("/")
            if len(parts) == 3 and parts[2] == "domain.json":
                try:
                    if self._read_domain(parts[1]).deleting:
                        names.append(parts[1])
                except DomainNotFound:
                    continue
        return names

    def list_domains(self) -> list[Domain]:
        """All domains, sorted by name."""
        names = []
        for info in self._store.list("domains/"):
            parts = info.key.split("/")
            if len(parts) == 3 and parts[2] == "domain.json":
                names.append(parts[1])
        domains = []
        for name in sorted(names):
            try:
                domains.append(self.get_domain(name))
            except DomainNotFound:
                continue  # removed while we were listing
        return domains

    # -- artifacts ----------------------------------------------------------------------------------

    def prefix(self, domain: str, kind: ArtifactKind) -> str:
        """The key prefix under which ``kind`` versions of ``domain`` live, e.g. ``domains/law/indexes``."""
        _check_name(domain)
        return f"domains/{domain}/{ArtifactKind(kind).value}"

    def publish(
        self,
        domain: str,
        kind: ArtifactKind,
        files: Mapping[str, Path] | Path,
        metadata: Mapping[str, Any] | None = None,
        *,
        progress: Callable[[str, int], None] | None = None,
    ) -> Manifest:
        """Store a new version of ``kind`` for an existing domain (see ``artifacts.publish``)."""
        self.get_domain(domain)
        return artifacts.publish(self._store, self.prefix(domain, kind), files, metadata, progress=progress)

    def list_versions(self, domain: str, kind: ArtifactKind) -> list[Manifest]:
        """Complete versions of ``kind``, oldest first."""
        self.get_domain(domain)
        return artifacts.list_versions(self._store, self.prefix(domain, kind))

    def read_manifest(self, domain: str, kind: ArtifactKind, version: str) -> Manifest:
        """The manifest of one complete version; ``VersionNotFound`` otherwise (``DomainNotFound`` when the
        domain itself is missing)."""
        try:
            return artifacts.read_manifest(self._store, self.prefix(domain, kind), version)
        except VersionNotFound as exc:
            self.get_domain(domain)
            raise VersionNotFound(f"domain {domain!r} has no complete {kind} version {version!r}") from exc

    def download(self, domain: str, kind: ArtifactKind, version: str, dest_dir: Path) -> Manifest:
        """Fetch one version into ``dest_dir`` with checksum verification (see ``artifacts.download``)."""
        self.read_manifest(domain, kind, version)
        return artifacts.download(self._store, self.prefix(domain, kind), version, dest_dir)

    # -- live pointer -------------------------------------------------------------------------------

    def live(self, domain: str) -> LivePointer:
        """The live pointer with its ETag; an empty pointer (``etag=None``) before the first change."""
        key = _live_key(domain)
        try:
            data, info = self._store.read(key)
        except ObjectNotFound:
            self.get_domain(domain)
            return LivePointer()
        return _parse(LivePointer, data, key).model_copy(update={"etag": info.etag})

    def set_live(
        self,
        domain: str,
        *,
        adapter_version: str | None = None,
        index_version: str | None = None,
        passages_version: str | None = None,
        expected_etag: str | None,
    ) -> LivePointer:
        """Compare-and-swap the live pointer: make the given versions live (``None`` leaves a kind as it is)
        and push the old state on history.

        ``expected_etag`` is the ETag of the pointer the caller read, or ``None`` if it read none (then only
        the first writer creates it). Any other state raises ``PreconditionFailed``; an incomplete version
        raises ``VersionNotFound``.
        """
        changes = {
            ArtifactKind.ADAPTERS: adapter_version,
            ArtifactKind.INDEXES: index_version,
            ArtifactKind.PASSAGES: passages_version,
        }
        for kind, version in changes.items():
            if version is not None:
                self.read_manifest(domain, kind, version)
        return self._advance(domain, changes, expected_etag, strict=True)

    def promote(
        self,
        domain: str,
        adapter_version: str,
        index_version: str | None = None,
        expected_etag: str | None = None,
    ) -> LivePointer:
        """Make an adapter version live, with its index.

        The index is ``index_version`` if given, else the ``index_version`` in the adapter manifest's
        metadata, else the live index stays. The passages follow the index manifest's ``passages_version``
        metadata when it has one. Without ``expected_etag`` it applies to the pointer as read here; with it,
        only to that pointer. A concurrent change raises ``PreconditionFailed`` either way.
        """
        adapter = self.read_manifest(domain, ArtifactKind.ADAPTERS, adapter_version)
        index_version = index_version or adapter.metadata.get("index_version")
        passages_version = None
        if index_version is not None:
            index = self.read_manifest(domain, ArtifactKind.INDEXES, index_version)
            passages_version = index.metadata.get("passages_version")
            if passages_version is not None:
                self.read_manifest(domain, ArtifactKind.PASSAGES, passages_version)
        changes = {
            ArtifactKind.ADAPTERS: adapter_version,
            ArtifactKind.INDEXES: index_version,
            ArtifactKind.PASSAGES: passages_version,
        }
        return self._advance(domain, changes, expected_etag, strict=expected_etag is not None)

    def rollback(self, domain: str, expected_etag: str | None = None) -> LivePointer:
        """Return to the newest history entry, dropping it from history.

        ``NothingToRollback`` if there is none; ``VersionNotFound`` if a version of that entry has been
        deleted by ``gc`` (promote a version explicitly then).
        """

        def back(current: LivePointer) -> LivePointer:
            if not current.history:
                raise NothingToRollback(f"domain {domain!r} has no earlier live state to roll back to")
            previous = current.history[-1]
            for kind, version in previous.versions().items():
                if version is not None and not self._complete(domain, kind, version):
                    raise VersionNotFound(
                        f"cannot roll back domain {domain!r}: its previous live {kind} version {version!r} "
                        "has been deleted; promote an existing version instead"
                    )
            return LivePointer(
                **previous.model_dump(exclude={"updated_at"}),
                updated_at=datetime.now(UTC),
                history=current.history[:-1],
                pinned=current.pinned,
            )

        return self._update(domain, expected_etag, back, strict=expected_etag is not None)

    def pin(self, domain: str, version: str, expected_etag: str | None = None) -> LivePointer:
        """Protect a version (of any kind) from ``gc``."""
        if not any(self._complete(domain, kind, version) for kind in ArtifactKind):
            raise VersionNotFound(f"domain {domain!r} has no complete version {version!r} of any kind")

        def add(current: LivePointer) -> LivePointer:
            if version in current.pinned:
                return current
            return current.model_copy(update={"pinned": [*current.pinned, version]})

        return self._update(domain, expected_etag, add, strict=expected_etag is not None)

    def unpin(self, domain: str, version: str, expected_etag: str | None = None) -> LivePointer:
        """Let ``gc`` consider a version again; unpinning a version that is not pinned changes nothing."""

        def remove(current: LivePointer) -> LivePointer:
            if version not in current.pinned:
                return current
            return current.model_copy(
                update={"pinned": [pinned for pinned in current.pinned if pinned != version]}
            )

        return self._update(domain, expected_etag, remove, strict=expected_etag is not None)

    # -- retention ----------------------------------------------------------------------------------

    def gc(
        self,
        domain: str,
        keep_last: int,
        *,
        incomplete_older_than: timedelta = timedelta(hours=1),
        protect: Iterable[str] = (),
        dry_run: bool = False,
    ) -> list[str]:
        """Delete old versions; return them as ``"<kind>/<version>"``. Runs only when asked.

        Per kind, keeps the newest ``keep_last`` complete versions, every live or pinned one, the versions in
        ``protect`` (e.g. those a queued run starts from) and what the kept ones need: the index version a
        kept adapter version names, the passages version of a kept index. History entries are not protected:
        rolling back to a deleted one raises ``VersionNotFound``. Also sweeps versions left without a manifest
        by failed publishes, once untouched for ``incomplete_older_than``. ``dry_run``: only say what would
        go. Do not run it while promoting versions it might delete.
        """
        if keep_last < 0:
            raise ValueError("keep_last must be >= 0")
        pointer = self.live(domain)
        keep = {version for version in (*pointer.versions().values(), *pointer.pinned, *protect) if version}
        deleted = []
        # Adapters first: a kept adapter keeps its index, and a kept index its passages.
        order = (
            (ArtifactKind.ADAPTERS, "index_version"),
            (ArtifactKind.INDEXES, "passages_version"),
            (ArtifactKind.PASSAGES, None),
        )
        for kind, needs in order:
            prefix = self.prefix(domain, kind)
            manifests = artifacts.list_versions(self._store, prefix)
            recent = {manifest.version for manifest in manifests[-keep_last:]} if keep_last else set()
            for manifest in manifests:
                if manifest.version in recent or manifest.version in keep:
                    if needs and manifest.metadata.get(needs):
                        keep.add(manifest.metadata[needs])
                    continue
                if not dry_run:
                    artifacts.delete_version(self._store, prefix, manifest.version)
                deleted.append(f"{kind}/{manifest.version}")
            swept = artifacts.delete_incomplete(
                self._store, prefix, older_than=incomplete_older_than, dry_run=dry_run
            )
            deleted.extend(f"{kind}/{version}" for version in swept)
        return deleted

    # -- internals ----------------------------------------------------------------------------------

    def _read_domain(self, name: str) -> Domain:
        _check_name(name)
        try:
            data, info = self._store.read(_domain_key(name))
        except ObjectNotFound as exc:
            raise DomainNotFound(f"domain {name!r} does not exist") from exc
        return _parse(Domain, data, _domain_key(name)).model_copy(update={"etag": info.etag})

    def _complete(self, domain: str, kind: ArtifactKind, version: str) -> bool:
        try:
            self.read_manifest(domain, kind, version)
        except VersionNotFound:
            return False
        return True

    def _advance(
        self,
        domain: str,
        changes: Mapping[ArtifactKind, str | None],
        expected_etag: str | None,
        *,
        strict: bool,
    ) -> LivePointer:
        """Apply version changes (``None`` = keep), pushing the previous state on history if it differs."""

        def apply(current: LivePointer) -> LivePointer:
            before = current.versions()
            after = {kind: changes.get(kind) or before[kind] for kind in ArtifactKind}
            history = list(current.history)
            if after != before and any(before.values()):
                history.append(LiveState(**current.model_dump(include=set(LiveState.model_fields))))
            return LivePointer(
                adapter_version=after[ArtifactKind.ADAPTERS],
                index_version=after[ArtifactKind.INDEXES],
                passages_version=after[ArtifactKind.PASSAGES],
                updated_at=datetime.now(UTC),
                history=history[-HISTORY_LIMIT:],
                pinned=current.pinned,
            )

        return self._update(domain, expected_etag, apply, strict=strict)

    def _update(
        self,
        domain: str,
        expected_etag: str | None,
        change: Callable[[LivePointer], LivePointer],
        *,
        strict: bool,
    ) -> LivePointer:
        """Read-modify-write ``live.json`` as a compare-and-swap on the ETag read here. ``strict``: the
        pointer read must also be the one the caller expects (``expected_etag``, ``None`` = no pointer)."""
        current = self.live(domain)
        expected = expected_etag.strip().strip('"') if expected_etag is not None else None
        if strict and expected != current.etag:
            found = (
                "no live pointer yet"
                if current.etag is None
                else f"a live pointer with ETag {current.etag!r}"
            )
            wanted = "none" if expected is None else repr(expected)
            raise PreconditionFailed(
                f"domain {domain!r} has {found}, but the caller expected {wanted}; read it again and retry"
            )
        updated = change(current)
        if updated is current:
            return current
        body = updated.model_dump_json(indent=2).encode()
        try:
            if current.etag is None:
                info = self._store.put_bytes(_live_key(domain), body, if_none_match=True)
            else:
                info = self._store.put_bytes(_live_key(domain), body, if_match=current.etag)
        except PreconditionFailed as exc:
            raise PreconditionFailed(
                f"live pointer of domain {domain!r} was changed by another writer; read it again and retry"
            ) from exc
        return updated.model_copy(update={"etag": info.etag})


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not DOMAIN_NAME.fullmatch(name):
        raise InvalidDomainName(f"domain name {name!r} must match ^{DOMAIN_NAME.pattern}$")
    return name


def _domain_key(name: str) -> str:
    return f"domains/{_check_name(name)}/domain.json"


def _live_key(name: str) -> str:
    return f"domains/{_check_name(name)}/live.json"


def _parse(model: type[_Model], data: bytes, key: str) -> _Model:
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        raise IntegrityError(f"{key} is unreadable: {exc}") from exc

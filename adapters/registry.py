"""Adapter versions of a domain: publish a trained adapter set, list them, fetch one for the loaded backbone.

An adapter version is the directory ``Backbone.save_adapter_set`` writes (``question/``, ``passage/`` and
``generator/``, each a PEFT adapter) stored as an artifact under ``domains/<domain>/adapters/<version>/``,
with the backbone fingerprint, run, metrics, parent and index version in its manifest, and the LoRA
configuration (`backbone.AdapterSetConfig`) stored whole beside them and read back whole (`lora_config`).
Making a version live is ``storage.DomainRegistry.promote``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from adapters.errors import AdapterIncompatible, AdapterVersionNotFound, InvalidAdapterSet
from backbone import COMPONENTS, AdapterLoadError, AdapterSetConfig
from storage import artifacts
from storage.artifacts import Manifest
from storage.errors import IntegrityError, VersionNotFound
from storage.registry import ArtifactKind, DomainRegistry
from storage.store import ObjectStore

if TYPE_CHECKING:
    from backbone import Backbone

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True)
class AdapterRef:
    """One adapter version as it travels from where it is chosen (a request's admission, a run's parent) to
    the model that runs it, like vLLM's LoRARequest: the domain, the version, and the checksum of its files
    (`Manifest.checksum`), which pins the very weights chosen. `key` is the name the backbone attaches it by.
    """

    domain: str
    version: str
    checksum: str

    @classmethod
    def of(cls, domain: str, manifest: Manifest) -> AdapterRef:
        return cls(domain, manifest.version, manifest.checksum)

    @property
    def key(self) -> str:
        return f"{self.domain}@{self.version}"


class AdapterRegistry:
    """Adapter versions per domain, on top of ``DomainRegistry``."""

    def __init__(self, store: ObjectStore) -> None:
        self._store = store
        self._domains = DomainRegistry(store)

    def publish(
        self,
        domain: str,
        directory: Path,
        *,
        backbone_fingerprint: str,
        lora: AdapterSetConfig,
        run_id: str | None = None,
        metrics: Mapping[str, Any] | None = None,
        parent: str | None = None,
        index_version: str | None = None,
        checkpoint_step: int | None = None,
        progress: Callable[[str, int], None] | None = None,
    ) -> Manifest:
        """Store an adapter set directory as a new version of ``domain``; returns its manifest. ``lora``: the
        configuration the set was made with, recorded whole. ``checkpoint_step``: the version is the run's
        checkpoint at that step."""
        directory = Path(directory)
        missing = [
            f"{component}/{name}"
            for component in COMPONENTS
            for name in ADAPTER_FILES
            if not (directory / component / name).is_file()
        ]
        if missing:
            raise InvalidAdapterSet(f"{directory} is not an adapter set: missing {', '.join(missing)}")
        metadata = {
            "backbone_fingerprint": backbone_fingerprint,
            "run_id": run_id,
            "metrics": dict(metrics or {}),
            "parent": parent,
            "index_version": index_version,
            "lora": lora.model_dump(mode="json"),
        }
        if checkpoint_step is not None:
            metadata["checkpoint_step"] = checkpoint_step
        return self._domains.publish(domain, ArtifactKind.ADAPTERS, directory, metadata, progress=progress)

    def list(self, domain: str) -> list[Manifest]:
        """Complete adapter versions of ``domain``, oldest first."""
        return self._domains.list_versions(domain, ArtifactKind.ADAPTERS)

    def get(self, domain: str, version: str) -> Manifest:
        """The manifest of one adapter version; ``AdapterVersionNotFound`` if it is not there."""
        try:
            return self._domains.read_manifest(domain, ArtifactKind.ADAPTERS, version)
        except VersionNotFound as exc:
            raise AdapterVersionNotFound(f"domain {domain!r} has no adapter version {version!r}") from exc

    def ref(self, domain: str, version: str) -> AdapterRef:
        """The reference of one adapter version; ``AdapterVersionNotFound`` if it is not there."""
        return AdapterRef.of(domain, self.get(domain, version))

    def fetch(self, ref: AdapterRef, dest_dir: Path, *, expected_fingerprint: str) -> Manifest:
        """Download the adapter version ``ref`` names into ``dest_dir`` with checksums verified.

        Refuses before downloading anything with ``AdapterIncompatible`` when the version was trained on a
        backbone other than ``expected_fingerprint`` (the loaded backbone's), and with ``IntegrityError`` when
        the version in the store is not the one referenced (other files under the same name).
        """
        manifest = self.get(ref.domain, ref.version)
        trained_on = manifest.metadata.get("backbone_fingerprint")
        if trained_on != expected_fingerprint:
            raise AdapterIncompatible(
                f"adapter {ref.domain}/{ref.version} was trained on backbone {trained_on!r}, "
                f"but the loaded backbone is {expected_fingerprint!r}"
            )
        if manifest.checksum != ref.checksum:
            raise IntegrityError(
                f"adapter {ref.domain}/{ref.version} in the store holds other files than the one referenced"
            )
        return artifacts.download(
            self._store, self._domains.prefix(ref.domain, ArtifactKind.ADAPTERS), ref.version, dest_dir
        )

    def attach(self, backbone: Backbone, ref: AdapterRef, cache_dir: Path, *, name: str | None = None) -> str:
        """Attach the version ``ref`` names to ``backbone`` under ``name`` (by default ``ref.key``), fetched
        into ``cache_dir`` unless it is there already; returns the name."""
        directory = Path(cache_dir) / f"adapter-{ref.version}"
        if not directory.exists():
            self.fetch(ref, directory, expected_fingerprint=backbone.fingerprint)
        name = name or ref.key
        backbone.load_adapter_set(name, directory)
        return name


def lora_config(manifest: Manifest) -> AdapterSetConfig | None:
    """The LoRA configuration an adapter version was trained with, read back whole from its manifest; None
    for a version that recorded none (its `lora` is empty: published before versions recorded it).
    AdapterLoadError (adapter_invalid) when what it recorded does not parse."""
    recorded = manifest.metadata.get("lora")
    if not recorded:
        return None
    try:
        return AdapterSetConfig.model_validate(recorded)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}" for error in exc.errors()
        )
        raise AdapterLoadError(
            f"adapter version {manifest.version} records a LoRA configuration that does not parse: {problems}"
        ) from exc

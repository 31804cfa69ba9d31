"""GET /domains and GET /domains/{d}: what each domain is, what serves it, and which versions it has."""

from __future__ import annotations

from anyio import to_thread
from litestar import get
from litestar.di import NamedDependency
from litestar.params import FromPath

from storage import ArtifactKind, DomainRegistry
from storage.artifacts import Manifest

from ..problems import ProblemOperation, problem_responses
from ..runtime import Runtime
from ..schemas import AdapterVersionInfo, DomainInfo, DomainList, DomainVersions, IndexVersionInfo, LiveInfo


@get(
    "/domains",
    tags=["domains"],
    operation_id="listDomains",
    summary="List domains",
    operation_class=ProblemOperation,
    responses=problem_responses(503),
)
async def list_domains(runtime: NamedDependency[Runtime]) -> DomainList:
    def read() -> DomainList:
        return DomainList(domains=[describe(runtime, d.name) for d in runtime.registry.list_domains()])

    return await to_thread.run_sync(read)


@get(
    "/domains/{name:str}",
    tags=["domains"],
    operation_id="getDomain",
    summary="Describe one domain",
    operation_class=ProblemOperation,
    responses=problem_responses(404, 422, 503),
)
async def get_domain(name: FromPath[str], runtime: NamedDependency[Runtime]) -> DomainInfo:
    return await to_thread.run_sync(describe, runtime, name)


def describe(runtime: Runtime, name: str) -> DomainInfo:
    """A domain as the store describes it now (blocking: store reads)."""
    registry: DomainRegistry = runtime.registry
    record = registry.get_domain(name)
    pointer = registry.live(name)
    adapters = registry.list_versions(name, ArtifactKind.ADAPTERS)
    indexes = registry.list_versions(name, ArtifactKind.INDEXES)
    live_adapter = next((m for m in adapters if m.version == pointer.adapter_version), None)
    live_index = next((m for m in indexes if m.version == pointer.index_version), None)
    retrieval = record.settings.get("retrieval")
    if retrieval not in ("dense", "bm25", "hybrid"):
        retrieval = (
            live_index.metadata.get("build", {}).get("index", {}).get("retrieval", "dense")
            if live_index is not None
            else "dense"
        )
    runs = runtime.runs.list(name)
    last_run = max(runs, key=lambda run: run.created_at).model_dump(mode="json") if runs else None
    return DomainInfo(
        name=record.name,
        description=record.description,
        passages=live_index.metadata.get("passage_count") if live_index is not None else None,
        retrieval=retrieval,
        live=LiveInfo(
            adapter_version=pointer.adapter_version,
            index_version=pointer.index_version,
            passages_version=pointer.passages_version,
            updated_at=pointer.updated_at,
        ),
        metrics=dict(live_adapter.metadata.get("metrics") or {}) if live_adapter is not None else {},
        last_run=last_run,
        versions=DomainVersions(
            adapters=[_adapter(m) for m in adapters], indexes=[_index(m) for m in indexes]
        ),
        etag=pointer.etag,
    )


def _adapter(manifest: Manifest) -> AdapterVersionInfo:
    meta = manifest.metadata
    return AdapterVersionInfo(
        version=manifest.version,
        created_at=manifest.created_at,
        run_id=meta.get("run_id"),
        parent=meta.get("parent"),
        index_version=meta.get("index_version"),
        metrics=dict(meta.get("metrics") or {}),
    )


def _index(manifest: Manifest) -> IndexVersionInfo:
    meta = manifest.metadata
    return IndexVersionInfo(
        version=manifest.version,
        created_at=manifest.created_at,
        passages_version=meta.get("passages_version"),
        adapter_version=meta.get("adapter_version"),
        passages=meta.get("passage_count"),
        factory=meta.get("factory"),
    )

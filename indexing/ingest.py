"""`ingest`: a corpus file in, a live domain index out. The function behind `ragadapt ingest`.

It runs in the calling process (a one-shot command, with a progress bar on stderr): chunk and validate the
corpus, publish it as a passages version, encode and index it, publish the index version, and point the
domain's live index and passages at them. Nothing is published unless the corpus is valid, and the live
pointer moves only once both versions are complete.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from backbone import Backbone, BackboneConfig
from storage import DomainExists, DomainRegistry, ObjectStore, new_version_id

from .builder import BuildInfo, IndexConfig, build_index
from .chunking import ChunkConfig, load_corpus, write_passages
from .encoder import EncodeConfig
from .publish import publish_build
from .versions import IndexVersions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestResult:
    domain: str
    passages_version: str
    index_version: str
    passage_count: int
    info: BuildInfo
    seconds: float


def ingest(
    domain: str,
    passages_path: Path,
    store: ObjectStore,
    backbone_config: BackboneConfig,
    *,
    backbone: Backbone | None = None,
    cache_dir: Path | None = None,
    chunk: ChunkConfig = ChunkConfig(),
    index: IndexConfig = IndexConfig(),
    encode: EncodeConfig = EncodeConfig(),
    adapter_dir: Path | None = None,
    adapter_version: str | None = None,
    description: str = "",
) -> IngestResult:
    """Ingest `passages_path` (passages or documents: JSONL, .txt, .md, or a directory of them) into `domain`.

    Creates the domain if it does not exist. `backbone` reuses an already loaded backbone (else one is loaded
    from `backbone_config`). `cache_dir` keeps the built index as a cached version for a server on this
    machine and the encoder's shards for resuming an interrupted run; without it everything goes to a temp
    dir. A domain that already serves an adapter needs that adapter's directory and version (`adapter_dir`,
    `adapter_version`): its index must be encoded with the adapter's passage encoder (AdapterMismatch
    otherwise).

    Raises MalformedPassages (with the line) or EmptyCorpus before anything is published.
    """
    started = time.perf_counter()
    passages = load_corpus(Path(passages_path), chunk)
    log.info("read %d passages for domain %s from %s", len(passages), domain, passages_path)
    registry = DomainRegistry(store)
    with contextlib.suppress(DomainExists):
        registry.create_domain(domain, description=description)
    scratch = Path(tempfile.mkdtemp(prefix=f"ragadapt-ingest-{domain}-"))
    versions = IndexVersions(registry, cache_dir if cache_dir is not None else scratch / "cache")
    try:
        pointer = versions.live(domain)
        passages_file = scratch / "passages.jsonl"
        write_passages(passages, passages_file)
        backbone = backbone or Backbone.load(backbone_config)
        adapter = None
        if adapter_dir is not None:
            adapter = f"ingest-{adapter_version or 'adapter'}"
            backbone.load_adapter_set(adapter, Path(adapter_dir))
        work_dir = Path(cache_dir) / "work" / domain if cache_dir is not None else scratch / "work"
        build_dir = scratch / "index"
        try:
            info = build_index(
                backbone,
                passages,
                build_dir,
                build_id=new_version_id(),
                adapter=adapter,
                adapter_version=adapter_version,
                config=index,
                encode=encode,
                work_dir=work_dir,
            )
        finally:
            if adapter is not None:
                backbone.remove_adapter_set(adapter)
        published = publish_build(
            versions, domain, build_dir, passages=passages_file, source=str(passages_path)
        )
        versions.make_live(
            domain,
            published.index_version,
            passages_version=published.passages_version,
            replacing=pointer.index_version,
            adapter_version=adapter_version,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    seconds = round(time.perf_counter() - started, 3)
    log.info(
        "domain %s serves index %s (%d passages, %s) after %.1fs",
        domain,
        published.index_version,
        len(passages),
        info.factory,
        seconds,
    )
    return IngestResult(
        domain,
        published.passages_version,
        published.index_version,
        len(passages),
        BuildInfo.from_dict({**info.to_dict(), "passages_version": published.passages_version}),
        seconds,
    )

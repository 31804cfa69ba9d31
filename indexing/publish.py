"""Publishing what was built: the one sequence that turns an index build into versions of a domain, and the
index versions that runs and evaluations build for themselves.

- `publish_build`: a new corpus (when the build brought one) as a passages version, then the index as an
  index version recording it, moved into the local version cache. Nothing goes live: making it live is
  `IndexVersions.make_live`, a compare-and-swap on the live pointer, which `ingest` and a flipping
  `RebuildJob` call next.
- `build_domain_index`: passages encoded by an adapter set's passage encoder (a run's, once trained), built
  with the domain's settings and published.
- `base_index_version`: the domain's live passages under the base passage encoder, found or built.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from backbone import Backbone, Passage
from storage import new_version_id

from .builder import IndexConfig, build_index
from .encoder import EncodeConfig
from .errors import IndexNotReady
from .searcher import IndexHandle
from .versions import IndexVersions


@dataclass(frozen=True)
class Published:
    domain: str
    index_version: str
    passages_version: str | None  # the passages the index was built from (new, or as given)
    directory: Path  # the index, in the version cache (or where it was built, when it could not move)


def publish_build(
    versions: IndexVersions,
    domain: str,
    directory: Path,
    *,
    passages: Path | None = None,
    source: str | None = None,
    passages_version: str | None = None,
) -> Published:
    """Publish a built index directory as a new index version of `domain`. `passages`: the canonical passages
    file of a new corpus, published first as a passages version (from `source`) that the index records;
    otherwise `passages_version` names the published passages it was built from (None: as its build says)."""
    if passages is not None:
        passages_version = versions.publish_passages(domain, passages, source=source)
    index_version = versions.publish_index(domain, directory, passages_version=passages_version)
    return Published(
        domain, index_version, passages_version, versions.adopt(domain, index_version, directory)
    )


def build_domain_index(
    backbone: Backbone,
    key: str | None,
    passages: list[Passage],
    versions: IndexVersions,
    domain: str,
    *,
    passages_version: str | None,
    config: IndexConfig,
    work_dir: Path,
    on_progress: Callable[[str, int, int], None] | None = None,
    encode: EncodeConfig | None = None,
) -> str:
    """Encode `passages` with the passage encoder of adapter set `key` (None: base), build the index with
    the domain's settings and publish it as a new index version (nothing goes live; the build stays in the
    version cache); returns the version. `encode` None: in this process, without a progress bar."""
    directory = Path(work_dir) / f"index-{new_version_id()}"
    try:
        build_index(
            backbone,
            passages,
            directory,
            build_id=directory.name.removeprefix("index-"),
            adapter=key,
            passages_version=passages_version,
            config=config,
            encode=encode or EncodeConfig(progress=False),
            work_dir=Path(work_dir) / "shards",
            on_progress=on_progress,
        )
        return publish_build(versions, domain, directory).index_version
    finally:  # what could not move into the version cache
        shutil.rmtree(directory, ignore_errors=True)


def base_index_version(
    backbone: Backbone,
    versions: IndexVersions,
    domain: str,
    *,
    work_dir: Path,
    on_progress: Callable[[str, int, int], None] | None = None,
    encode: EncodeConfig | None = None,
) -> str:
    """A published index of the domain's live passages encoded by the base passage encoder (no LoRA), for
    runs that start from zero LoRA and for evaluating the base backbone: the live one if it is, else an
    earlier matching version, else one built and published now."""
    live = versions.live(domain).index_version
    if live is None:
        raise IndexNotReady(f"domain {domain!r} has no index yet")
    live_info = versions.build_info(domain, live)
    if live_info.passage_adapter == "base" and live_info.encoder_fingerprint == backbone.fingerprint:
        return live
    for version in reversed(versions.versions(domain)):
        info = versions.build_info(domain, version)
        if (
            info.passage_adapter == "base"
            and info.encoder_fingerprint == backbone.fingerprint
            and info.passages_checksum == live_info.passages_checksum
        ):
            return version
    handle = IndexHandle.open(versions.fetch(domain, live), domain=domain, version=live)
    return build_domain_index(
        backbone,
        None,
        list(handle.passages),
        versions,
        domain,
        passages_version=live_info.passages_version,
        config=live_info.config,
        work_dir=work_dir,
        on_progress=on_progress,
        encode=encode,
    )

"""Passage encoding for index builds: batched, length-sorted, no autograd, resumable by shard.

The frozen passage encoder runs in the backbone's dtype and on its device (bf16 on CPUs with AVX512-BF16/AMX,
CUDA when present); the backbone picks both at load time. Within a shard, passages are sorted by length so a
batch pads to similar lengths, and the embeddings are put back in corpus order.

Large corpora are encoded in shards of `shard_size` passages, each saved as `.npy` in a work directory named
after what produced it (backbone fingerprint, passage-adapter weights, passages checksum, encoding settings).
A restarted build finds its finished shards there and skips them; shards of another encoder, adapter or corpus
live under another name and are never mixed in.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from backbone import Backbone, Passage

from .chunking import passages_checksum
from .errors import RebuildCancelled
from .files import atomic_file
from .ray_encoding import RayEncoding, encode_rows

ProgressFn = Callable[[int, int], None]  # (passages done, passages total)
SHARD_FORMAT = 1


@dataclass(frozen=True)
class EncodeConfig:
    batch_size: int = 64
    shard_size: int = 8192
    sort_by_length: bool = True
    progress: bool = True  # a tqdm bar on stderr
    keep_shards: bool = False  # keep the work-dir shards after a finished encode
    threads: int | None = None  # torch threads of a rebuild process (None: torch's default, all cores)
    ray: RayEncoding | None = None  # encode on a Ray cluster with Ray Data (None: in the calling process)


def adapter_digest(backbone: Backbone, adapter: str | None) -> str:
    """Identity of the passage-encoder weights an adapter set contributes ("base" for none)."""
    if adapter is None:
        return "base"
    state = backbone.adapter_set_weights(adapter).states["passage"]
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def encoding_identity(
    backbone: Backbone,
    passages: list[Passage],
    adapter: str | None,
    config: EncodeConfig,
    checksum: str | None = None,
) -> dict:
    """Everything the embeddings depend on; shards are reused only when all of it matches."""
    return {
        "format": SHARD_FORMAT,
        "encoder_fingerprint": backbone.fingerprint,
        "passage_adapter": adapter_digest(backbone, adapter),
        "passages_checksum": checksum or passages_checksum(passages),
        "passage_count": len(passages),
        "shard_size": config.shard_size,
        "max_passage_tokens": backbone.config.max_passage_tokens,
        "dtype": str(backbone.dtype),
        "dim": backbone.embedding_dim,
    }


def shard_directory(work_dir: Path, identity: dict) -> Path:
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
    return Path(work_dir) / f"shards-{key}"


def encode_passages(
    backbone: Backbone,
    passages: list[Passage],
    *,
    adapter: str | None = None,
    config: EncodeConfig = EncodeConfig(),
    work_dir: Path | None = None,
    checksum: str | None = None,
    on_progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> np.ndarray:
    """Embed passages with the passage encoder under `adapter` (None: base). Returns [n, dim] float32.

    With `work_dir`, finished shards are saved there and reused by a restarted call with the same encoder,
    adapter weights and passages. `should_stop` is polled between batches; when it returns True the call
    raises RebuildCancelled, leaving finished shards behind for a later resume.
    """
    n, dim = len(passages), backbone.embedding_dim
    out = np.empty((n, dim), dtype=np.float32)  # [n, dim]
    shards = [(start, min(start + config.shard_size, n)) for start in range(0, n, config.shard_size)]
    directory = None
    if work_dir is not None:
        identity = encoding_identity(backbone, passages, adapter, config, checksum)
        directory = _prepare_shard_directory(work_dir, identity)
    done = 0
    with tqdm(total=n, desc="encoding passages", unit="passage", disable=not config.progress) as bar:

        def advance(rows: int) -> None:
            nonlocal done
            done += rows
            bar.update(rows)
            if on_progress is not None:
                on_progress(done, n)

        def shard_file(number: int) -> Path | None:
            return directory / f"shard-{number:05d}.npy" if directory is not None else None

        pending = []
        for number, (start, end) in enumerate(shards):
            cached = _load_shard(shard_file(number), end - start, dim) if directory is not None else None
            if cached is None:
                pending.append((number, start, end))
            else:
                out[start:end] = cached
                advance(end - start)
        if config.ray is not None:
            _encode_on_ray(
                backbone, passages, pending, adapter, config, out, shard_file, advance, should_stop
            )
        else:
            for number, start, end in pending:
                out[start:end] = _encode_shard(
                    backbone, passages[start:end], adapter, config, should_stop, advance
                )
                if directory is not None:
                    _save_shard(shard_file(number), out[start:end])
    if directory is not None and not config.keep_shards:
        shutil.rmtree(directory, ignore_errors=True)
    return out


def _prepare_shard_directory(work_dir: Path, identity: dict) -> Path:
    """The shard directory of this identity; shards under an identity.json saying otherwise are dropped."""
    directory = shard_directory(work_dir, identity)
    identity_file = directory / "identity.json"
    if identity_file.is_file():
        try:
            recorded = json.loads(identity_file.read_text())
        except (OSError, ValueError):
            recorded = None
        if recorded == identity:
            return directory
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_file(identity_file) as fh:
        fh.write(json.dumps(identity, sort_keys=True).encode())
    return directory


def _encode_on_ray(
    backbone: Backbone,
    passages: list[Passage],
    pending: list[tuple[int, int, int]],
    adapter: str | None,
    config: EncodeConfig,
    out: np.ndarray,
    shard_file: Callable[[int], Path | None],
    advance: Callable[[int], None],
    should_stop: Callable[[], bool] | None,
) -> None:
    """Encode the pending shards' rows on Ray in one pass (one actor pool for all of them), saving each
    shard once the last of its rows is in."""
    if not pending:
        return
    missing = {number: end - start for number, start, end in pending}
    bounds = {number: (start, end) for number, start, end in pending}

    def on_rows(rows: np.ndarray, embeddings: np.ndarray) -> None:
        out[rows] = embeddings
        for number, count in zip(*np.unique(rows // config.shard_size, return_counts=True), strict=True):
            number = int(number)
            missing[number] -= int(count)
            path = shard_file(number)
            if missing[number] == 0 and path is not None:
                start, end = bounds[number]
                _save_shard(path, out[start:end])
        advance(len(rows))

    rows = [i for _, start, end in pending for i in range(start, end)]
    encode_rows(backbone, passages, rows, adapter, config.ray, on_rows=on_rows, should_stop=should_stop)


def _encode_shard(
    backbone: Backbone,
    passages: list[Passage],
    adapter: str | None,
    config: EncodeConfig,
    should_stop: Callable[[], bool] | None,
    advance: Callable[[int], None],
) -> np.ndarray:
    """Encode one shard in length-sorted batches and return its rows in the original order: [rows, dim]."""
    order = list(range(len(passages)))
    if config.sort_by_length:
        order.sort(key=lambda i: len(passages[i].title) + len(passages[i].text), reverse=True)
    result = np.empty((len(passages), backbone.embedding_dim), dtype=np.float32)  # [rows, dim]
    with torch.inference_mode():
        for start in range(0, len(order), config.batch_size):
            if should_stop is not None and should_stop():
                raise RebuildCancelled("cancelled while encoding passages")
            rows = order[start : start + config.batch_size]
            embeddings = backbone.encode_passages([passages[i] for i in rows], adapter)  # [batch, dim]
            result[rows] = embeddings.cpu().numpy()
            advance(len(rows))
    return result


def _load_shard(path: Path, rows: int, dim: int) -> np.ndarray | None:
    """A finished shard, or None when it is missing or not what this build would have written."""
    if not path.is_file():
        return None
    try:
        shard = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if shard.shape != (rows, dim) or shard.dtype != np.float32 or not np.isfinite(shard).all():
        return None
    return shard


def _save_shard(path: Path, embeddings: np.ndarray) -> None:
    with atomic_file(path) as fh:
        np.save(fh, embeddings, allow_pickle=False)

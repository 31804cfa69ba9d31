"""Passage encoding on a Ray cluster (`indexing.executor: ray`): Ray Data streams the passages through a pool
of encoder actors, each holding the backbone and the adapter set once, on CPUs or GPUs.

The calling process (a rebuild's worker process) stays the driver: it sends the passages, scatters the rows
that come back into their places, saves each shard once all its rows are in (so a restarted build resumes
by shard, as the local pipeline does), and polls for a cancel between result batches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from backbone import Backbone, BackboneConfig, Passage

from .errors import RebuildCancelled
from .raycluster import RayCluster, connect

log = logging.getLogger(__name__)

_ADAPTER = "encode"  # the adapter set's key inside an encoder actor


@dataclass(frozen=True)
class RayEncoding:
    """How Ray Data encodes: `concurrency` encoder actors, each with `cpus_per_actor` CPUs (its torch threads)
    and `gpus_per_actor` GPUs, `batch_size` passages a call."""

    cluster: RayCluster
    batch_size: int = 64
    concurrency: int = 2
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0


class PassageEncoder:
    """A Ray Data actor: loads the backbone and attaches the adapter set once, then encodes batches."""

    def __init__(self, backbone: BackboneConfig, weights: list, threads: int):
        import ray

        torch.set_num_threads(threads)
        self.backbone = Backbone.load(backbone)
        self.key = None
        if weights[0] is not None:  # a reference in a list: Ray hands it over unresolved
            self.backbone.attach_adapter_set(_ADAPTER, ray.get(weights[0]))
            self.key = _ADAPTER

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        passages = [Passage(id="", title=str(t), text=str(x)) for t, x in zip(batch["title"], batch["text"])]
        with torch.inference_mode():
            embeddings = self.backbone.encode_passages(passages, self.key)  # [batch, dim]
        return {"row": batch["row"], "embedding": embeddings.float().cpu().numpy()}


def encode_rows(
    backbone: Backbone,
    passages: list[Passage],
    rows: list[int],
    adapter: str | None,
    config: RayEncoding,
    *,
    on_rows: Callable[[np.ndarray, np.ndarray], None],
    should_stop: Callable[[], bool] | None = None,
) -> None:
    """Encode `passages[i]` for each i in `rows` on the cluster; `on_rows(rows, embeddings [m, dim])` gets
    each batch as it arrives, in no particular order. Raises RebuildCancelled when `should_stop` says so."""
    import ray
    import ray.data

    connect(config.cluster)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # no per-dataset progress lines in the job logs
    weights = ray.put(backbone.adapter_set_weights(adapter)) if adapter is not None else None
    # Longest first, as the local pipeline sorts: batches of like lengths pad the least.
    ordered = sorted(rows, key=lambda i: len(passages[i].title) + len(passages[i].text), reverse=True)
    items = [{"row": i, "title": passages[i].title, "text": passages[i].text} for i in ordered]
    blocks = max(config.concurrency * 4, len(items) // (config.batch_size * 16), 1)
    dataset = ray.data.from_items(items, override_num_blocks=min(blocks, max(len(items), 1)))
    encoded = dataset.map_batches(
        PassageEncoder,
        fn_constructor_kwargs={
            "backbone": backbone.config,
            "weights": [weights],
            "threads": max(int(config.cpus_per_actor), 1),
        },
        batch_size=config.batch_size,
        batch_format="numpy",
        concurrency=config.concurrency,
        num_cpus=config.cpus_per_actor,
        num_gpus=config.gpus_per_actor or None,
    )
    for batch in encoded.iter_batches(batch_size=None, batch_format="numpy"):
        if should_stop is not None and should_stop():
            raise RebuildCancelled("cancelled while encoding passages")
        on_rows(np.asarray(batch["row"]), np.asarray(batch["embedding"], dtype=np.float32))

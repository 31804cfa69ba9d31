"""The Ray cluster that adaptation runs and passage re-encoding execute on when their executor is `ray`.

Ray is optional (the `ray` extra): nothing imports it unless a setting says `ray`, so the embedded default
serves and trains without it. A process connects once; the processes it starts (a rebuild's worker process,
a run's actor) join the same cluster by the address `connect` returns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayCluster:
    """Where the cluster is. `address`: a head's GCS address ("host:6379"), "auto" (the cluster this host
    joined with `ray start`), or a Ray Client address ("ray://host:10001"); None starts a local cluster
    inside the connecting process, of `num_cpus` CPUs (None: every core) and an object store of
    `object_store_bytes` (None: Ray's default share of memory)."""

    address: str | None = None
    namespace: str = "ragadapt"
    num_cpus: int | None = None
    object_store_bytes: int | None = None


def connect(cluster: RayCluster) -> str:
    """Connect this process to `cluster` (once; later calls reuse the connection) and return the address
    other processes join it with."""
    import ray

    if not ray.is_initialized():
        common = {"namespace": cluster.namespace, "logging_level": logging.WARNING, "log_to_driver": False}
        if cluster.address is not None:
            ray.init(address=cluster.address, **common)
        else:
            ray.init(
                num_cpus=cluster.num_cpus,
                object_store_memory=cluster.object_store_bytes,
                include_dashboard=False,
                **common,
            )
            log.info("started a local Ray cluster: %s", ray.cluster_resources())
    if cluster.address is not None and cluster.address.startswith("ray://"):
        return cluster.address
    return ray.get_runtime_context().gcs_address


def joined(cluster: RayCluster, address: str) -> RayCluster:
    """The same cluster, addressed so that another process joins it rather than starting its own."""
    return RayCluster(address=address, namespace=cluster.namespace)

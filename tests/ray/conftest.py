"""A real local Ray cluster, started once per session inside the test process (2 CPUs, a small object store),
and the tiny backbone and domain the runs train on."""

from __future__ import annotations

import pytest

from backbone import Backbone, BackboneConfig
from indexing.raycluster import RayCluster
from tests.models import tiny_backbone_config


@pytest.fixture(scope="session")
def ray_cluster() -> RayCluster:
    """The session's cluster, addressed so that the processes tests start join it."""
    import ray

    from indexing.raycluster import connect, joined

    cluster = RayCluster(namespace="ragadapt-tests", num_cpus=2, object_store_bytes=128 * 1024 * 1024)
    yield joined(cluster, connect(cluster))
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_config(tiny_root) -> BackboneConfig:
    return tiny_backbone_config(tiny_root)


@pytest.fixture(scope="session")
def tiny_backbone(tiny_config) -> Backbone:
    return Backbone.load(tiny_config)

"""Session fixtures shared across the suite: tiny random backbones and the embedded default backbone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# No test may reach a model hub; the real loading code must find everything locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

EMBEDDED_CACHE = Path(os.environ.get("RAGADAPT_TEST_CACHE", Path.home() / ".cache" / "ragadapt"))


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny_backbone_settings(tiny_root):
    """The service settings of the tiny random backbone the test servers load."""
    from service.settings import BackboneSettings
    from tests.models import tiny_backbone_config

    config = tiny_backbone_config(tiny_root)
    return BackboneSettings(
        question_encoder=config.question_encoder,
        passage_encoder=config.passage_encoder,
        generator=config.generator,
        cache_dir=config.cache_dir,
        dtype="float32",
        max_passage_tokens=48,
        max_answer_tokens=12,
    )


@pytest.fixture(scope="session")
def direct_backbone(tiny_backbone_settings):
    """A backbone of exactly the configuration the test servers load (answers must match it)."""
    from backbone import Backbone

    return Backbone.load(tiny_backbone_settings.config())


@pytest.fixture(scope="session")
def embedded_backbone():
    """The embedded default backbone, loaded once per session (converted GGUF cached across runs)."""
    from backbone import Backbone, embedded_default_config

    return Backbone.load(embedded_default_config(cache_dir=EMBEDDED_CACHE))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS on loopback) for the whole session; errors, never skips, without `weed`.

    Give each test its own bucket: ``S3Store(s3_server.store_config())`` picks a fresh random one.
    """
    from tests.s3server import SeaweedS3

    with SeaweedS3(tmp_path_factory.mktemp("s3server")) as server:
        yield server

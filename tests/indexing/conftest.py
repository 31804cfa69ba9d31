"""Shared fixtures: one tiny random backbone per session (built in code, no downloads)."""

from __future__ import annotations

import pytest

from backbone import Backbone, BackboneConfig, Passage
from tests.models import tiny_backbone_config


@pytest.fixture(scope="session")
def tiny_config(tiny_root) -> BackboneConfig:
    return tiny_backbone_config(tiny_root)


@pytest.fixture(scope="session")
def tiny_backbone(tiny_config) -> Backbone:
    return Backbone.load(tiny_config)


@pytest.fixture(scope="session")
def corpus() -> list[Passage]:
    """A small corpus whose passages differ in their words (so BM25 and assertions can tell them apart)."""
    topics = [
        ("Paris", "the capital of france is paris and the river is the seine"),
        ("Rome", "the capital of italy is rome and the river is the tiber"),
        ("Covid", "covid spreads through droplets and the incubation period is five days"),
        ("Revenue", "the company revenue was 42 million dollars in 2019 and 51 million in 2020"),
        ("Friends", "ross and rachel were on a break said ross to joey in the coffee house"),
        ("Encoders", "passages questions answers retrieval generator encoder adapter domain"),
    ]
    passages = []
    for round_ in range(5):
        for title, text in topics:
            passages.append(Passage(f"{title.lower()}-{round_}", title, f"{text} note {round_}"))
    return passages

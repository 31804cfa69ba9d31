"""A tiny domain on a LocalStore: passages ingested and live, a QA set with train and dev splits."""

from __future__ import annotations

import json
import multiprocessing
from dataclasses import dataclass
from pathlib import Path

import pytest

from adapters.qa import QaExample, QaSets
from backbone import Backbone, BackboneConfig
from indexing.ingest import ingest
from storage import LocalStore, ObjectStore
from tests.models import tiny_backbone_config

TOPICS = [
    ("Paris", "the capital of france is paris and the river is the seine."),
    ("Rome", "the capital of italy is rome and the river is the tiber."),
    ("Covid", "covid spreads through droplets and the incubation period is five days."),
    ("Revenue", "the company revenue was 42 million dollars in 2019 and 51 million in 2020."),
    ("Friends", "ross and rachel were on a break said ross to joey in the coffee house."),
]
QA = [
    QaExample("what is the capital of france", ("paris",), ("paris-0",), "train"),
    QaExample("what is the capital of italy", ("rome",), ("rome-0",), "train"),
    QaExample("what was the revenue in 2020", ("51 million",), ("revenue-0",), "train"),
    QaExample("who was on a break", ("ross and rachel",), ("friends-0",), "train"),
    QaExample("how long is the incubation period", ("five days",), ("covid-0",), "dev"),
    QaExample("which river runs through rome", ("tiber",), ("rome-0",), "dev"),
]


@dataclass
class Domain:
    name: str
    store: ObjectStore
    root: Path


@pytest.fixture(scope="session")
def tiny_config(tiny_root) -> BackboneConfig:
    return tiny_backbone_config(tiny_root)


@pytest.fixture(scope="session")
def tiny_backbone(tiny_config) -> Backbone:
    return Backbone.load(tiny_config)


def make_domain(
    root: Path,
    config: BackboneConfig,
    backbone: Backbone,
    name: str = "toy",
    store: ObjectStore | None = None,
) -> Domain:
    """The domain on `store` (default: a LocalStore under `root`)."""
    store = store if store is not None else LocalStore(root / "store")
    records = [
        {
            "id": f"{title.lower()}-{i}",
            "title": title,
            "text": f"{text} This is note {i} of the {title} file.",
        }
        for i in range(4)
        for title, text in TOPICS
    ]
    passages = root / "passages.jsonl"
    passages.write_text("".join(json.dumps(r) + "\n" for r in records))
    ingest(name, passages, store, config, backbone=backbone, cache_dir=root / "ingest-cache")
    QaSets(store).publish(name, QA, source="tests")
    return Domain(name, store, root)


@pytest.fixture
def domain(tmp_path, tiny_config, tiny_backbone) -> Domain:
    return make_domain(tmp_path, tiny_config, tiny_backbone)


def events_of(manager, run_id: str) -> list[dict]:
    """Every event of a RunManager's run, page after page."""
    found, after, more = [], 0, True
    while more:
        page, after, more = manager.events(run_id, after)
        found += page
    return found


def run_workers() -> dict[int, str]:
    """The run worker processes this process started and that are alive: pid -> token (as in their name,
    `run-worker-<token>`, and their scratch directory)."""
    return {
        process.pid: process.name.removeprefix("run-worker-")
        for process in multiprocessing.active_children()
        if process.name.startswith("run-worker-")
    }

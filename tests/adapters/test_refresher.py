"""A mid-run index refresh shares the trainer's cores instead of competing for all of them."""

from __future__ import annotations

import time

import pytest
import torch

from adapters.training import IndexRefresher
from indexing.builder import INDEX_FILE
from indexing.versions import IndexVersions
from storage import DomainRegistry


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_a_refresh_takes_half_the_threads_and_gives_them_back(domain, tiny_backbone, tmp_path, two_threads):
    tiny_backbone.add_adapter_set("refresh")
    try:
        versions = IndexVersions(DomainRegistry(domain.store), tmp_path / "indexes")
        refresher = IndexRefresher(domain.name, tiny_backbone, versions, tmp_path / "work")
        refresher.start(10, "refresh")
        assert refresher.job.spec.encode.threads == 1 and torch.get_num_threads() == 1
        deadline = time.monotonic() + 300
        while (outcome := refresher.poll()) is None:
            assert time.monotonic() < deadline, "the refresh never finished"
            time.sleep(0.1)
        status, directory, _ = outcome
        assert status == "succeeded" and (directory / INDEX_FILE).exists()
        assert torch.get_num_threads() == 2
    finally:
        tiny_backbone.remove_adapter_set("refresh")

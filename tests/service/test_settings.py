"""Settings come from RAGADAPT_* variables with nested groups, and bad combinations fail at start-up."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings


def test_nested_environment_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("RAGADAPT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("RAGADAPT_SERVER__PORT", "9123")
    monkeypatch.setenv("RAGADAPT_SERVER__API_KEYS", '["k1", "k2"]')
    monkeypatch.setenv("RAGADAPT_CACHE__PINNED", '["covid"]')
    monkeypatch.setenv("RAGADAPT_STORE__BACKEND", "s3")
    monkeypatch.setenv("RAGADAPT_STORE__ENDPOINT", "https://minio.example:9000")
    monkeypatch.setenv("RAGADAPT_STORE__ACCESS_KEY", "ragadapt")
    monkeypatch.setenv("RAGADAPT_STORE__SECRET_KEY", "s3cret")
    settings = Settings()
    assert settings.server.port == 9123
    assert [key.get_secret_value() for key in settings.server.api_keys] == ["k1", "k2"]
    assert settings.cache.pinned == ["covid"]
    config = settings.store_config
    assert (config.backend, config.endpoint, config.secure) == ("s3", "https://minio.example:9000", True)
    assert "s3cret" not in repr(settings)


def test_local_store_defaults_under_the_data_dir(tmp_path):
    settings = Settings(data_dir=tmp_path)
    assert settings.store_config.root == Path(tmp_path) / "store"


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ({"server": {"host": "0.0.0.0"}}, "admin_token"),
        ({"cache": {"hot_slots": 2, "pinned": ["a", "b"]}}, "hot slots"),
        ({"cache": {"pinned": ["Not A Name"]}}, "must match"),
        ({"server": {"queue_size": 4, "max_batch_rows": 8}}, "queue_size"),
        ({"store": {"backend": "s3"}}, "endpoint"),
        ({"backbone": {"generator": "/models/gen"}}, "together"),
    ],
)
def test_inconsistent_settings_fail_at_start_up(groups, message):
    with pytest.raises(ValidationError, match=message):
        Settings(**groups)


def test_an_exposed_server_with_an_admin_token_is_fine():
    settings = Settings(server={"host": "0.0.0.0", "admin_token": "t" * 32})
    assert not settings.server.is_loopback()


@pytest.mark.parametrize(
    ("groups", "cores", "budget"),
    [
        ({}, 2, (1, 1)),  # serving beside one local run worker: half each
        ({"runs": {"max_concurrent": 0}}, 2, (2, None)),  # no local training: serving keeps every core
        ({"runs": {"max_concurrent": 2}}, 16, (8, 4)),
        ({"runs": {"max_concurrent": 3}}, 2, (1, 1)),  # never below one thread
        ({"server": {"threads": 12}, "runs": {"threads": 2}}, 16, (12, 2)),  # set: as set
    ],
)
def test_serving_and_run_workers_split_the_cores(groups, cores, budget):
    assert Settings(**groups).thread_budget(cores) == budget


@pytest.mark.parametrize(
    ("server", "budget"),
    [
        ({}, 2 << 30),  # unset: an eighth of the host's 16 GiB
        ({"kv_cache_bytes": 0}, 0),  # off
        ({"kv_cache_bytes": 123_456}, 123_456),
    ],
)
def test_the_passage_kv_cache_budget(server, budget):
    assert Settings(server=server).server.kv_cache_budget(16 << 30) == budget

"""Adapter registry: publish adapter sets, fetch them only for the backbone they were trained on."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from adapters import (
    AdapterIncompatible,
    AdapterRef,
    AdapterRegistry,
    AdapterVersionNotFound,
    InvalidAdapterSet,
)
from adapters.registry import lora_config
from backbone import AdapterLoadError, AdapterSetConfig, LoraConfig
from storage import IntegrityError
from storage.artifacts import Manifest

FINGERPRINT = "backbone-minilm-smollm2-7f3a"
# What the fixture's PEFT configs say, for every component.
LORA = AdapterSetConfig(
    **dict.fromkeys(
        ("question", "passage", "generator"), LoraConfig(r=4, alpha=8, targets=["query", "value"])
    )
)


@pytest.fixture
def adapter_set(tmp_path):
    """What ``Backbone.save_adapter_set`` writes: one PEFT LoRA adapter per component, tiny random weights."""
    root = tmp_path / "adapter-set"
    rng = np.random.default_rng(0)
    for component in ("question", "passage", "generator"):
        directory = root / component
        directory.mkdir(parents=True)
        config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]}
        (directory / "adapter_config.json").write_text(json.dumps(config))
        save_file(
            {
                "base_model.model.query.lora_A.weight": rng.standard_normal((4, 16), dtype=np.float32),
                "base_model.model.query.lora_B.weight": rng.standard_normal((16, 4), dtype=np.float32),
            },
            str(directory / "adapter_model.safetensors"),
        )
    return root


@pytest.fixture
def adapters(registry):
    registry.create_domain("law")
    return AdapterRegistry(registry.store)


def _publish(adapters, adapter_set, **overrides):
    fields = dict(
        backbone_fingerprint=FINGERPRINT,
        run_id="run-1",
        metrics={"exact_match": 0.41},
        parent=None,
        index_version=None,
        lora=LORA,
    )
    return adapters.publish("law", adapter_set, **{**fields, **overrides})


def test_publish_records_provenance_and_fetch_restores_the_weights(adapters, adapter_set, tmp_path):
    manifest = _publish(adapters, adapter_set)

    assert manifest.metadata == {
        "backbone_fingerprint": FINGERPRINT,
        "run_id": "run-1",
        "metrics": {"exact_match": 0.41},
        "parent": None,
        "index_version": None,
        "lora": {
            component: {"r": 4, "alpha": 8, "dropout": 0.05, "targets": ["query", "value"]}
            for component in ("question", "passage", "generator")
        },
    }
    assert adapters.get("law", manifest.version) == manifest
    assert lora_config(adapters.get("law", manifest.version)) == LORA  # read back whole
    assert [m.version for m in adapters.list("law")] == [manifest.version]

    ref = adapters.ref("law", manifest.version)
    assert (
        ref == AdapterRef("law", manifest.version, manifest.checksum) and ref.key == f"law@{manifest.version}"
    )
    fetched = adapters.fetch(ref, tmp_path / "cache" / "v", expected_fingerprint=FINGERPRINT)

    assert fetched == manifest
    for component in ("question", "passage", "generator"):
        original = load_file(str(adapter_set / component / "adapter_model.safetensors"))
        restored = load_file(str(tmp_path / "cache" / "v" / component / "adapter_model.safetensors"))
        assert original.keys() == restored.keys()
        assert all(np.array_equal(original[name], restored[name]) for name in original)


def test_fetch_for_another_backbone_is_refused_before_downloading(adapters, adapter_set, tmp_path):
    manifest = _publish(adapters, adapter_set)

    with pytest.raises(AdapterIncompatible) as caught:
        adapters.fetch(
            AdapterRef.of("law", manifest), tmp_path / "v", expected_fingerprint="backbone-other-0000"
        )

    assert caught.value.code == "adapter_incompatible"
    assert FINGERPRINT in str(caught.value) and "backbone-other-0000" in str(caught.value)
    assert not (tmp_path / "v").exists()


def test_fetch_of_a_corrupted_adapter_fails_the_checksum(adapters, registry, adapter_set, tmp_path):
    manifest = _publish(adapters, adapter_set)
    key = f"domains/law/adapters/{manifest.version}/generator/adapter_model.safetensors"
    registry.store.put_bytes(key, b"not the trained weights")

    with pytest.raises(IntegrityError):
        adapters.fetch(AdapterRef.of("law", manifest), tmp_path / "v", expected_fingerprint=FINGERPRINT)
    assert not (tmp_path / "v").exists()


def test_a_directory_without_the_three_adapters_is_refused(adapters, adapter_set):
    (adapter_set / "passage" / "adapter_model.safetensors").unlink()

    with pytest.raises(InvalidAdapterSet) as caught:
        _publish(adapters, adapter_set)

    assert "passage/adapter_model.safetensors" in str(caught.value)
    assert adapters.list("law") == []


def test_unknown_adapter_version(adapters, tmp_path):
    with pytest.raises(AdapterVersionNotFound) as caught:
        adapters.get("law", "20990101T000000Z-abcdef")
    assert caught.value.code == "adapter_version_not_found"
    with pytest.raises(AdapterVersionNotFound):
        adapters.ref("law", "20990101T000000Z-abcdef")
    with pytest.raises(AdapterVersionNotFound):
        missing = AdapterRef("law", "20990101T000000Z-abcdef", "0" * 64)
        adapters.fetch(missing, tmp_path / "v", expected_fingerprint=FINGERPRINT)


def test_a_reference_to_other_files_than_the_stored_version_fetches_nothing(adapters, adapter_set, tmp_path):
    manifest = _publish(adapters, adapter_set)
    elsewhere = AdapterRef("law", manifest.version, "0" * 64)  # chosen when the version held other files

    with pytest.raises(IntegrityError, match="other files than the one referenced"):
        adapters.fetch(elsewhere, tmp_path / "v", expected_fingerprint=FINGERPRINT)
    assert not (tmp_path / "v").exists()


def _manifest(lora) -> Manifest:
    return Manifest(
        version="20990101T000000Z-abcdef",
        created_at="2099-01-01T00:00:00Z",
        files={},
        metadata={"lora": lora},
    )


def test_a_version_that_recorded_no_lora_configuration_reads_back_none():
    assert lora_config(_manifest({})) is None


def test_a_recorded_lora_configuration_that_does_not_parse_is_a_clear_error():
    with pytest.raises(AdapterLoadError) as caught:
        lora_config(_manifest({"question": {"r": "eight"}, "passage": {}, "generator": {}, "rank": 4}))
    assert caught.value.code == "adapter_invalid"
    message = str(caught.value)
    assert "20990101T000000Z-abcdef" in message and "question.r" in message and "rank" in message

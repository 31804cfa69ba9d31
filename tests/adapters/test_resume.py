"""The in-process path (`ragadapt adapt` / `--resume`): an interrupted run resumed from its checkpoint ends
with exactly the weights of an uninterrupted one, and what it trains is what the mode says."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from adapters.cli import adapt, resume
from adapters.errors import RunInterrupted
from adapters.execution import Workspace, execute
from adapters.lease import RunContext
from adapters.queue import submit
from adapters.records import RunStore, owner_token
from adapters.registry import AdapterRef, AdapterRegistry
from adapters.spec import RunRequest, RunState
from storage import DomainRegistry

STEPS = 8
RETRIEVER_STEPS = 3


def request(mode: str = "end2end") -> RunRequest:
    return RunRequest.model_validate(
        {
            "domain": "toy",
            "mode": mode,
            "promote": "never",
            "evaluation": None,
            "hyperparameters": {
                "steps": STEPS,
                "retriever_steps": 0 if mode == "generator_only" else RETRIEVER_STEPS,
                "retriever_batch_size": 4,
                "batch_size": 2,
                "top_k": 2,
                "checkpoint_every": 3,
                "seed": 7,
                "reconstruction_ratio": 0.3,
                "index_refresh_every": 1000,
            },
        }
    )


def weights(store, version: str, tmp_path) -> dict[str, dict[str, torch.Tensor]]:
    target = tmp_path / f"fetched-{version}"
    adapters = AdapterRegistry(store)
    manifest = adapters.get("toy", version)
    adapters.fetch(
        AdapterRef.of("toy", manifest), target, expected_fingerprint=manifest.metadata["backbone_fingerprint"]
    )
    return {
        c: load_file(target / c / "adapter_model.safetensors") for c in ("question", "passage", "generator")
    }


def test_an_interrupted_run_resumes_to_the_same_weights(domain, tiny_config, tiny_backbone, tmp_path):
    workspace = Workspace(tiny_config, tmp_path / "work", {"none": tiny_backbone})
    straight = adapt(
        domain.store, tiny_config, request(), tmp_path / "work", progress=False, workspace=workspace
    )
    assert straight.state == RunState.SUCCEEDED, straight.error
    assert straight.total_steps == RETRIEVER_STEPS + STEPS
    a = weights(domain.store, straight.adapter_version, tmp_path)
    trained = [t for c in a.values() for n, t in c.items() if "lora_B" in n]
    assert all(t.abs().sum() > 0 for t in trained)  # every component's LoRA moved off zero

    # Stopped while the trainer waits for the index refresh that ends the retriever phase (one tick per step
    # until then, so the 4th tick is the first of that wait), and in the joint phase (once step 5 is logged:
    # events go out at every step here). Either way the resumed run ends where the straight one did.
    runs = RunStore(domain.store)
    for stopped_at in (RETRIEVER_STEPS, 5):
        owner = owner_token("test")
        record = submit(runs, request(), owner=owner)
        ticks = []

        def stop_now(stopped_at=stopped_at, record=record, ticks=ticks) -> bool:
            ticks.append(1)
            if stopped_at == RETRIEVER_STEPS:
                return len(ticks) >= RETRIEVER_STEPS + 1
            return any(e["kind"] == "step" and e["step"] >= stopped_at for e in runs.events(record.id)[0])

        with pytest.raises(RunInterrupted):
            execute(RunContext(runs, record, owner, should_stop=stop_now, flush_s=0), workspace)
        stopped = runs.get(record.id)
        assert stopped.state == RunState.QUEUED and stopped.checkpoint_step == stopped_at  # saved on the way

        resumed = resume(domain.store, tiny_config, record.id, tmp_path / "work", progress=False)
        assert resumed.state == RunState.SUCCEEDED, resumed.error
        b = weights(domain.store, resumed.adapter_version, tmp_path)
        for component in a:
            assert a[component].keys() == b[component].keys()
            for name in a[component]:
                torch.testing.assert_close(a[component][name], b[component][name], rtol=0, atol=0)
        events, _ = runs.events(record.id)
        assert [e["step"] for e in events if e["kind"] == "phase"] == [RETRIEVER_STEPS]


def test_generator_only_trains_the_generator_and_keeps_the_index(
    domain, tiny_config, tiny_backbone, tmp_path
):
    workspace = Workspace(tiny_config, tmp_path / "work", {"none": tiny_backbone})
    hyperparameters = request().hyperparameters.model_copy(
        update={"index_refresh_every": None, "retriever_steps": 0}
    )
    info = adapt(
        domain.store,
        tiny_config,
        request("generator_only").model_copy(update={"hyperparameters": hyperparameters}),
        tmp_path / "work",
        progress=False,
        workspace=workspace,
    )
    assert info.state == RunState.SUCCEEDED, info.error
    w = weights(domain.store, info.adapter_version, tmp_path)
    assert all(t.abs().sum() == 0 for c in ("question", "passage") for n, t in w[c].items() if "lora_B" in n)
    assert all(t.abs().sum() > 0 for n, t in w["generator"].items() if "lora_B" in n)
    # A frozen retriever needs no new index: the version serves from the one it trained against.
    assert info.index_version == DomainRegistry(domain.store).live("toy").index_version

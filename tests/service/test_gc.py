"""`POST /admin/gc` and `ragadapt gc`: a dry run says what would go, an applied one removes old versions and
what faults leave behind (the leftovers are laid out in the store as those faults leave them), and never what
serves or what a queued run needs."""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta

from adapters.queue import submit
from adapters.records import RunStore, now
from adapters.spec import RunRequest, RunState
from adapters.validation import prepare
from service.cli import main
from storage import ArtifactKind, DomainRegistry, LocalStore, new_version_id, open_store
from tests.service.support import ADMIN, ingest_domain, publish_adapter, serve

ASK = {"question": "what is the capital of france", "top_k": 2, "max_new_tokens": 3}
RUN = RunRequest.model_validate(
    {
        "domain": "toy",
        "promote": "never",
        "evaluation": None,
        "train": {"examples": [{"question": "what is the capital of france", "answers": ["paris"]}]},
    }
)
HOURS_AGO = time.time() - 3 * 3600


def _age(store_root, prefix: str) -> None:
    """Make every file under a key prefix of a local store look untouched for hours."""
    for path in (store_root / "objects" / prefix).rglob("*"):
        os.utime(path, (HOURS_AGO, HOURS_AGO))


def _leftovers(store, root, backbone, tmp_path) -> dict:
    """A domain with old versions and what faults leave behind; returns what gc should find."""
    registry, runs = DomainRegistry(store), RunStore(store)
    ingest_domain(store, backbone, "toy", tmp_path / "corpus")
    adapters = [publish_adapter(store, backbone, "toy", seed, tmp_path / "adapters") for seed in range(4)]
    registry.promote("toy", adapters[0])
    # A queued run starting from adapters[1] (promoted then, rolled back since).
    registry.promote("toy", adapters[1])
    queued = submit(runs, RUN)
    registry.rollback("toy")
    # A publish that failed half-way: files without a manifest.
    incomplete = new_version_id()
    store.put_bytes(f"domains/toy/adapters/{incomplete}/question/adapter_model.safetensors", b"partial")
    _age(root, f"domains/toy/adapters/{incomplete}")
    # A run that ended while its worker died before deleting its checkpoint.
    ended = submit(runs, RUN)
    runs.update(ended.id, lambda r: r.model_copy(update={"state": RunState.FAILED}))
    runs.dequeue(ended.id)
    store.put_bytes(f"runs/{ended.id}/checkpoints/{new_version_id()}/state.json", b"{}")
    # A submit that died before its record was written, and one that died before it queued its run.
    orphan = new_version_id()
    store.put_bytes(f"runs/{orphan}/inputs/train.jsonl", b"{}\n")
    _age(root, f"runs/{orphan}")
    stuck = prepare(store, RUN, new_version_id())
    runs.create(stuck.record.model_copy(update={"created_at": now() - timedelta(hours=2)}))
    # The passages of a finished job, and a domain whose deletion was interrupted.
    finished_job = new_version_id()
    store.put_bytes(f"jobs/{finished_job}/passages.jsonl", b"{}\n")
    _age(root, f"jobs/{finished_job}")
    registry.create_domain("half")
    registry.update_domain("half", lambda d: d.model_copy(update={"deleting": True}))
    return {
        "adapters": adapters,
        "queued": queued.id,
        "incomplete": incomplete,
        "ended": ended.id,
        "orphan": orphan,
        "stuck": stuck.record.id,
        "job": finished_job,
    }


def test_gc_dry_run_then_apply(local_store_settings, make_settings, direct_backbone, tmp_path):
    settings = make_settings(local_store_settings)
    store = open_store(settings.store_config)
    found = _leftovers(store, settings.store_config.root, direct_backbone, tmp_path)
    adapters = found["adapters"]
    dead_worker = settings.cache_dir / "runs" / "worker-0badc0de"
    (dead_worker / "runs").mkdir(parents=True)
    with serve(settings) as served, served.client() as client:
        planned = client.post("/admin/gc", headers=ADMIN, json={"keep_last": 1})
        assert planned.status_code == 200, planned.text
        report = planned.json()
        assert report["dry_run"] and report["keep_last"] == 1
        # adapters[0] serves, [1] a queued run starts from, [3] is the newest: only [2] and the broken one go.
        assert sorted(report["versions"]) == sorted(
            [f"toy/adapters/{adapters[2]}", f"toy/adapters/{found['incomplete']}"]
        )
        assert sorted(report["runs"]) == sorted([found["ended"], found["orphan"]])
        assert report["failed_runs"] == [found["stuck"]]
        assert report["job_inputs"] == [found["job"]] and report["domains"] == ["half"]
        assert report["scratch"] == ["cache/runs/worker-0badc0de"]
        assert dead_worker.exists() and list(store.list(f"runs/{found['orphan']}/"))  # nothing went yet

        applied = client.post("/admin/gc", headers=ADMIN, json={"keep_last": 1, "dry_run": False}).json()
        assert {**applied, "dry_run": True} == report
        again = client.post("/admin/gc", headers=ADMIN, json={"keep_last": 1, "dry_run": False}).json()
        assert all(
            again[key] == []
            for key in ("versions", "runs", "failed_runs", "job_inputs", "domains", "scratch")
        )
        registry = DomainRegistry(store)
        kept = [m.version for m in registry.list_versions("toy", ArtifactKind.ADAPTERS)]
        assert kept == [adapters[0], adapters[1], adapters[3]]
        answer = client.post("/ask", params={"domain": "toy"}, json=ASK).json()
        assert answer["adapter_version"] == adapters[0]
        runs = RunStore(store)
        assert runs.get(found["queued"]).state == RunState.QUEUED
        assert runs.get(found["stuck"]).state == RunState.FAILED
        assert runs.latest_checkpoint(found["ended"]) is None and not dead_worker.exists()
        assert list(store.list(f"runs/{found['orphan']}/")) == [] and list(store.list("domains/half/")) == []
        assert client.post("/admin/gc", headers=ADMIN, json={"domains": ["nosuch"]}).status_code == 404
        bad = client.post("/admin/gc", headers=ADMIN, json={"keep_last": -1, "domains": ["Bad Name"]})
        assert bad.status_code == 422


def test_the_gc_command_is_a_dry_run_unless_told(monkeypatch, tmp_path, capsys, direct_backbone):
    monkeypatch.setenv("RAGADAPT_DATA_DIR", str(tmp_path / "data"))
    store = LocalStore(tmp_path / "data" / "store")  # where the command's settings put it
    ingest_domain(store, direct_backbone, "toy", tmp_path / "corpus")
    adapters = [
        publish_adapter(store, direct_backbone, "toy", seed, tmp_path / "adapters") for seed in range(3)
    ]
    expected = [f"toy/adapters/{version}" for version in adapters[:2]]

    assert main(["gc", "--keep-last", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["versions"] == expected
    assert len(DomainRegistry(store).list_versions("toy", ArtifactKind.ADAPTERS)) == 3
    assert main(["gc", "--keep-last", "1", "--domain", "toy", "--apply"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["versions"] == expected and not report["dry_run"]
    kept = DomainRegistry(store).list_versions("toy", ArtifactKind.ADAPTERS)
    assert [m.version for m in kept] == adapters[2:]

"""Runs are validated before they are queued, and their records and events survive concurrent writers."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from pydantic import ValidationError

from adapters.errors import InvalidRun, RunFinished
from adapters.queue import claim_next, requeue, submit
from adapters.records import EVENTS_PER_PAGE, RunStore, now, owner_token
from adapters.spec import RunRequest, RunState
from adapters.supervisor import RunManager
from adapters.validation import prepare
from backbone import AdapterLoadError
from storage import ArtifactKind, DomainNotFound, DomainRegistry, artifacts, new_version_id


def request(**body) -> RunRequest:
    return RunRequest.model_validate({"domain": "toy", **body})


def assert_nothing_queued(store) -> None:
    runs = RunStore(store)
    assert runs.list() == []
    assert runs.active() == []


def test_unknown_domain_is_404_before_anything_is_stored(domain):
    with pytest.raises(DomainNotFound) as caught:
        submit(RunStore(domain.store), request(domain="nosuch"))
    assert caught.value.status == 404 and caught.value.code == "domain_not_found"
    assert_nothing_queued(domain.store)


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ({"train": {"split": "nosuch"}}, "no training examples"),
        ({"train": {"uri": "uploads/missing.jsonl"}}, "names no object"),
        ({"mode": "generator_only", "hyperparameters": {"index_refresh_every": 10}}, "nothing to re-index"),
        ({"evaluation": None}, "if_better"),
        ({"hyperparameters": {"top_k": 99}}, "passages"),
        ({"hyperparameters": {"quantize_generator": "4bit"}}, "CUDA"),
    ],
)
def test_bad_data_and_contradicting_settings_are_rejected_before_queueing(domain, body, why):
    with pytest.raises(InvalidRun, match=why) as caught:
        submit(RunStore(domain.store), request(**body), cuda_available=False)
    assert caught.value.status == 422 and caught.value.code == "invalid_run"
    assert_nothing_queued(domain.store)


def test_a_malformed_uploaded_file_is_rejected_with_its_line(domain):
    domain.store.put_bytes("uploads/train.jsonl", b'{"question": "q", "answers": ["a"]}\n{"question": "q2"\n')
    with pytest.raises(InvalidRun, match="line 2"):
        submit(RunStore(domain.store), request(train={"uri": "uploads/train.jsonl"}))
    assert_nothing_queued(domain.store)


def test_shape_errors_fail_while_parsing_the_request():
    with pytest.raises(ValidationError):
        request(hyperparameters={"steps": 10, "epochs": 1})
    with pytest.raises(ValidationError):
        request(train={"split": "train", "uri": "x"})
    with pytest.raises(ValidationError):
        request(hyperparameters={"learning_rate": 1e-4})  # unknown fields are errors, not ignored
    with pytest.raises(ValidationError, match="answers"):
        request(train={"examples": [{"question": "what is it", "answers": []}]})
    with pytest.raises(ValidationError, match="question"):
        request(train={"examples": [{"question": "  ", "answers": ["x"]}]})
    with pytest.raises(ValidationError, match="steps"):
        request(hyperparameters={"steps": "10"})  # a value of another JSON type is not converted
    assert request(hyperparameters={"steps": 10.0}).hyperparameters.steps == 10  # an integral number


def test_a_valid_run_is_queued_with_frozen_inputs_and_its_steps_counted(domain):
    runs = RunStore(domain.store)
    record = submit(
        runs,
        request(
            hyperparameters={"epochs": 2, "batch_size": 2, "retriever_batch_size": 8, "retriever_epochs": 2}
        ),
    )
    assert record.state == RunState.QUEUED
    # The retriever phase: 2 epochs of 24 pairs (20 inverse-cloze ones, 4 questions with gold), 8 a step; then
    # the joint phase: 2 epochs of 4 training examples, 2 a step.
    assert record.request.hyperparameters.retriever_steps == 6
    assert record.total_steps == 6 + 4
    assert runs.active() == [record.id]
    assert runs.get_input(record.id, "train.jsonl").count(b"\n") == 4
    assert runs.get_input(record.id, "eval.jsonl").count(b"\n") == 2
    assert record.request.train.uri == f"runs/{record.id}/inputs/train.jsonl"
    events, last = runs.events(record.id)
    assert [e["state"] for e in events] == ["validating", "queued"] and last == 2


def test_a_submit_interrupted_after_its_queue_marker_is_taken_by_a_worker(domain):
    """A submit writes the record (validating), the inputs, the queue marker, then the state queued. A crash
    before the last write leaves a validating run with a marker; once older than a submit takes, it is run."""
    runs = RunStore(domain.store)

    def interrupted_submit(age: timedelta) -> str:
        prepared = prepare(domain.store, request(), new_version_id())
        record = runs.create(prepared.record.model_copy(update={"created_at": now() - age}))
        for name, data in prepared.inputs.items():
            runs.put_input(record.id, name, data)
        runs.enqueue(record.id)
        return record.id

    stale, fresh = interrupted_submit(timedelta(minutes=5)), interrupted_submit(timedelta(0))
    claimed = claim_next(runs, "test-worker", lease_s=30, max_crashes=2)
    assert claimed is not None and claimed.id == stale and claimed.state == RunState.RUNNING
    assert claim_next(runs, "test-worker", lease_s=30, max_crashes=2) is None  # a submit still under way
    assert runs.get(fresh).state == RunState.VALIDATING
    events, _ = runs.events(stale)
    assert [e["state"] for e in events if e["kind"] == "state"] == ["queued", "running"]


def test_runs_submitted_within_one_second_start_in_submission_order(domain, monkeypatch):
    # Ids sort only to the second; these two sort against their submission order.
    ids = iter(["20261201T120000Z-ffffff", "20261201T120000Z-000000"])
    monkeypatch.setattr("adapters.queue.new_version_id", lambda: next(ids))
    runs = RunStore(domain.store)
    first, second = submit(runs, request()), submit(runs, request())
    assert runs.active() == [second.id, first.id]
    assert claim_next(runs, "test-worker", lease_s=30, max_crashes=2).id == first.id
    assert claim_next(runs, "test-worker", lease_s=30, max_crashes=2).id == second.id


def test_a_requeued_run_resumes_from_the_newest_checkpoint_in_the_store_even_if_unrecorded(domain, tmp_path):
    # A worker killed between publishing its step-20 checkpoint and recording it in run.json.
    runs = RunStore(domain.store)
    owner = owner_token("killed-worker")
    record = submit(runs, request(), owner=owner)
    directory = tmp_path / "checkpoint"
    directory.mkdir()
    (directory / "trainer.json").write_text("{}")
    artifacts.publish(domain.store, runs.checkpoints_prefix(record.id), directory, {"step": 20, "index": {}})
    assert runs.get(record.id).checkpoint_step is None

    requeue(runs, record.id, reason="its worker died", owner=owner, crashed=True)
    back = runs.get(record.id)
    assert back.state == RunState.QUEUED and back.checkpoint_step == 20 and back.crashes == 1
    events, _ = runs.events(record.id)
    assert events[-1]["state"] == "queued" and events[-1]["resumes_from"] == 20


def test_cancelling_a_queued_run_ends_it_at_once_and_twice_is_409(domain, tiny_config, tmp_path):
    manager = RunManager(domain.store, tiny_config, tmp_path / "work")  # not started: the run stays queued
    info = manager.submit(request())
    assert info.state == RunState.QUEUED
    cancelled = manager.cancel(info.id)
    assert cancelled.state == RunState.CANCELLED and cancelled.finished_at is not None
    assert RunStore(domain.store).active() == []
    with pytest.raises(RunFinished) as caught:
        manager.cancel(info.id)
    assert caught.value.status == 409
    assert [r.id for r in manager.list("toy")] == [info.id] and manager.list("other") == []


def test_events_page_and_concurrent_appends_keep_one_gapless_sequence(domain):
    runs = RunStore(domain.store)
    run_id = submit(runs, request()).id
    writers = 4
    per_writer = EVENTS_PER_PAGE // 2 + 3  # enough to spill over two pages

    def write(name: str) -> None:
        writer = RunStore(domain.store)
        for i in range(per_writer):
            writer.append_events(run_id, [{"kind": "step", "writer": name, "i": i}])

    threads = [threading.Thread(target=write, args=(f"w{n}",)) for n in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    events, last = runs.events(run_id)
    assert [e["seq"] for e in events] == list(range(1, last + 1))
    assert last == 2 + writers * per_writer
    for n in range(writers):  # each writer's events, in its own order
        assert [e["i"] for e in events if e.get("writer") == f"w{n}"] == list(range(per_writer))
    later, next_after = runs.events(run_id, after=EVENTS_PER_PAGE + 5)
    assert [e["seq"] for e in later] == list(range(EVENTS_PER_PAGE + 6, last + 1)) and next_after == last
    assert runs.events(run_id, after=last) == ([], last)


def test_a_live_adapter_whose_lora_configuration_does_not_parse_is_a_clear_error(domain, tmp_path):
    """A run that starts from the live adapter takes its LoRA configuration, read back whole; one that does
    not parse refuses the run (it used to start from the defaults instead, silently)."""
    registry = DomainRegistry(domain.store)
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"lora")
    damaged = {"question": {"r": "eight"}, "passage": {}, "generator": {}}
    version = registry.publish("toy", ArtifactKind.ADAPTERS, {"w.bin": weights}, {"lora": damaged}).version
    registry.promote("toy", version)
    with pytest.raises(AdapterLoadError, match=f"{version} records a LoRA configuration that does not parse"):
        submit(RunStore(domain.store), request())
    assert_nothing_queued(domain.store)
    assert submit(RunStore(domain.store), request(hyperparameters={"init": "base"})).state == RunState.QUEUED

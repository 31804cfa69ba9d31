"""The promotion policy, branch by branch (`decide` is pure), and carrying a decision out on a real store."""

from __future__ import annotations

import pytest

from adapters.evaluation import EvalReport
from adapters.promotion import Decision, apply, decide
from adapters.records import RunRecord, now
from adapters.spec import RunRequest, RunState
from storage import ArtifactKind, DomainRegistry, LivePointer, LocalStore, new_version_id

PARENT, OTHER, RUN_VERSION = new_version_id(), new_version_id(), new_version_id()


def report(f1: list[float]) -> dict:
    """An evaluation report whose per-question F1 outcomes are `f1`."""
    ids = [f"q{i}" for i in range(len(f1))]
    return EvalReport(
        questions=len(f1),
        exact_match=sum(f1) / len(f1),
        f1=sum(f1) / len(f1),
        recall={},
        retrieval_questions=0,
        top_k=5,
        answer_retrieval="dense",
        index_version=None,
        adapter_version=None,
        seconds=0.0,
        per_question={"answered": ids, "f1": f1, "em": f1},
    ).to_dict()


WORSE, BETTER = report([0.0] * 20), report([1.0] * 20)


def record(
    policy: str = "if_better", *, parent: str | None = PARENT, adapter_version: str = RUN_VERSION, **fields
) -> RunRecord:
    return RunRecord(
        id=new_version_id(),
        domain="toy",
        mode="end2end",
        state=RunState.RUNNING,
        total_steps=1,
        created_at=now(),
        parent=parent,
        promote=policy,
        adapter_version=adapter_version,
        request=RunRequest(domain="toy", promote=policy),
        **fields,
    )


def live(adapter_version: str | None = PARENT) -> LivePointer:
    return LivePointer(adapter_version=adapter_version, etag="etag-1")


def test_an_already_promoted_run_stays_promoted_without_reading_the_pointer():
    assert decide(record(promoted=True), None) == Decision(True, "promoted")


def test_never_promotes_nothing():
    assert decide(record("never"), None) == Decision(False, "policy is never")


def test_a_version_already_live_was_promoted_before_a_crash_could_record_it():
    assert decide(record(), live(RUN_VERSION)) == Decision(True, "promoted")


def test_always_moves_the_pointer_unconditionally():
    assert decide(record("always"), live()) == Decision(True, "promoted", move=True, expected_etag=None)


def test_if_better_needs_a_final_evaluation():
    assert decide(record(metrics={"base": WORSE, "final": None}), live()) == Decision(
        False, "no evaluation to compare"
    )


def test_if_better_refuses_a_gain_that_is_not_significant():
    decision = decide(record(metrics={"base": WORSE, "final": WORSE}), live())
    assert not decision.promoted and not decision.move
    assert decision.reason.startswith("not significantly better than what serves: f1 +0.0000")


def test_if_better_promotes_a_significant_gain_only_over_the_pointer_it_read():
    decision = decide(record(metrics={"base": WORSE, "final": BETTER}), live())
    assert decision.promoted and decision.move and decision.expected_etag == "etag-1"
    assert decision.reason.startswith("better than what served: f1 +1.0000")


def test_if_better_without_a_base_report_promotes():
    decision = decide(record(parent=None, metrics={"base": None, "final": BETTER}), live(None))
    assert decision == Decision(True, "better than what served: nothing to compare with", True, "etag-1")


def test_if_better_refuses_when_the_live_adapter_changed_during_the_run():
    decision = decide(record(metrics={"base": WORSE, "final": BETTER}), live(OTHER))
    assert decision == Decision(False, f"the live adapter changed during the run ({PARENT} -> {OTHER})")


def test_a_pointer_that_needs_reading_must_be_given():
    with pytest.raises(ValueError, match="live pointer"):
        decide(record("always"), None)


@pytest.fixture
def domains(tmp_path) -> tuple[DomainRegistry, list[str]]:
    """A domain with three adapter versions (their files do not matter to the pointer), the first live."""
    registry = DomainRegistry(LocalStore(tmp_path / "store"))
    registry.create_domain("toy")
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"lora")
    versions = [registry.publish("toy", ArtifactKind.ADAPTERS, {"w.bin": weights}).version for _ in range(3)]
    registry.promote("toy", versions[0])
    return registry, versions


def test_applying_a_decision_moves_the_live_pointer(domains):
    registry, (_, trained, _) = domains
    run = record("always", adapter_version=trained)
    assert apply(registry, run, decide(run, registry.live("toy"))) == (True, "promoted")
    assert registry.live("toy").adapter_version == trained


def test_a_pointer_moved_between_deciding_and_applying_is_left_alone(domains):
    registry, (parent, trained, other) = domains
    run = record(parent=parent, adapter_version=trained, metrics={"base": WORSE, "final": BETTER})
    decision = decide(run, registry.live("toy"))
    assert decision.move
    registry.promote("toy", other)  # someone else promotes meanwhile
    promoted, why = apply(registry, run, decision)
    assert not promoted and why.startswith("the live pointer changed while promoting")
    assert registry.live("toy").adapter_version == other

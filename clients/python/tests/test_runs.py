"""Runs through a scripted server that plays a run's life: what ``create`` sends, how ``wait()`` polls and
reports, the typed errors of failed and cancelled runs, and ``events()`` across pages."""

from __future__ import annotations

import asyncio
import itertools
import json
from urllib.parse import parse_qs, urlsplit

import pytest

from ragadapt_client import (
    AsyncClient,
    Client,
    ConflictError,
    Hyperparameters,
    LoraSpec,
    LoraSpecs,
    RunCancelledError,
    RunFailedError,
    WaitTimeoutError,
)

from scripted import Received, Reply

BASE = {
    "id": "r1",
    "domain": "covid",
    "mode": "end2end",
    "state": "queued",
    "step": 0,
    "total_steps": 4,
    "created_at": "2026-11-21T10:00:00Z",
    "started_at": None,
    "finished_at": None,
    "error": None,
    "metrics": {"base": None, "final": None},
    "adapter_version": None,
    "index_version": None,
    "promoted": False,
    "latest": None,
}


def _run(**changes) -> dict:
    return {**BASE, **changes}


LIFE = [
    _run(state="running", step=1, latest={"loss": 2.5, "lr": 1e-4, "examples_per_s": 3.0}),
    _run(state="running", step=3, latest={"loss": 1.25, "lr": 1e-4, "examples_per_s": 3.1}),
    _run(
        state="succeeded",
        step=4,
        latest={"loss": 0.75, "lr": 1e-4, "examples_per_s": 3.2},
        metrics={"base": {"em": 0.1}, "final": {"em": 0.4}},
        adapter_version="v2",
        promoted=True,
    ),
]
KINDS = [
    ("state", {"state": "running"}),
    ("step", {"step": 1, "loss": 2.5}),
    ("rebuild", {"index_version": "i2"}),
    ("step", {"step": 4, "loss": 0.75}),
    ("state", {"state": "succeeded"}),
]
EVENTS = [
    {"seq": n, "time": "2026-11-21T10:00:00Z", "kind": kind, **extra}
    for n, (kind, extra) in enumerate(KINDS, start=1)
]


def play(scripted, life: list[dict], events: list[dict] | None = None, page: int = 2) -> None:
    """GET /admin/runs/r1 walks through ``life`` (then stays at its end); events come ``page`` at a time."""
    states = list(life)

    def respond(received: Received) -> Reply:
        url = urlsplit(received.path)
        if url.path == "/admin/adapt":
            return Reply(202, BASE)
        if url.path == "/admin/runs/r1":
            return Reply(200, states.pop(0) if len(states) > 1 else states[0])
        if url.path == "/admin/runs/r1/events":
            after = int(parse_qs(url.query)["after"][0])
            found = [e for e in events or [] if e["seq"] > after][:page]
            return Reply(200, {"events": found, "next": found[-1]["seq"] if found else after})
        return Reply.problem(404, "not_found")

    scripted.respond = respond


def test_create_sends_the_run_request(scripted, using):
    play(scripted, [BASE])
    hyper = Hyperparameters(steps=4, lr=1e-4, lora=LoraSpecs(generator=LoraSpec(r=4, alpha=8)))
    run = using(
        scripted.url,
        lambda client: client.runs.create(
            "covid", mode="generator_only", promote="never", hyperparameters=hyper
        ),
        admin_token="t",
    )
    assert run.id == "r1" and run.info.state == "queued" and run.info.latest.loss is None
    body = json.loads(scripted.received[0].body)
    assert body == {
        "domain": "covid",
        "mode": "generator_only",
        "promote": "never",
        "train": {"split": "train", "synthetic": {}},
        "hyperparameters": {"steps": 4, "lr": 1e-4, "lora": {"generator": {"r": 4, "alpha": 8}}},
    }


def test_create_with_synthetic_data_alone_or_none_and_a_promotion_metric(scripted, using):
    play(scripted, [BASE])
    generated = {"generated": {"max_passages": 300}, "ict": None}
    using(
        scripted.url,
        lambda client: client.runs.create(
            "covid",
            use_qa=False,
            synthetic=generated,
            promote_metric="recall@5",
            hyperparameters=Hyperparameters(retriever_epochs=2, contrastive_weight=0.5),
        ),
        admin_token="t",
    )
    using(scripted.url, lambda client: client.runs.create("covid", synthetic=False), admin_token="t")
    first, second = (json.loads(r.body) for r in scripted.received)
    assert first["train"] == {"synthetic": generated} and first["promote_metric"] == "recall@5"
    assert first["hyperparameters"] == {"retriever_epochs": 2, "contrastive_weight": 0.5}
    assert second["train"] == {"split": "train"} and "promote_metric" not in second
    with Client("http://127.0.0.1:9") as client, pytest.raises(ValueError, match="synthetic data alone"):
        client.runs.create("covid", use_qa=False, synthetic=False)


def test_create_with_inline_examples_or_a_uri(scripted, using):
    play(scripted, [BASE])
    examples = [{"question": "incubation?", "answers": ["five days"]}]
    using(
        scripted.url,
        lambda client: client.runs.create("covid", examples=examples, hyperparameters={"steps": 2}),
        admin_token="t",
    )
    using(scripted.url, lambda client: client.runs.create("covid", uri="qa/covid.jsonl"), admin_token="t")
    first, second = (json.loads(r.body) for r in scripted.received)
    assert first["train"] == {"examples": examples, "synthetic": {}} and first["hyperparameters"] == {
        "steps": 2
    }
    assert second["train"] == {"uri": "qa/covid.jsonl", "synthetic": {}} and second["hyperparameters"] == {}


def test_create_refuses_two_training_sources():
    with Client("http://127.0.0.1:9") as client, pytest.raises(ValueError, match="at most one"):
        client.runs.create("covid", split="train", uri="qa/covid.jsonl")


def test_wait_polls_until_succeeded_and_shows_steps_and_loss(scripted, capsys):
    play(scripted, LIFE)
    with Client(scripted.url, admin_token="t") as client:
        run = client.runs.create("covid")
        final = run.wait(progress=True, poll_interval=0.01, max_poll_interval=0.05)
    assert final.state == "succeeded" and final.promoted and final.adapter_version == "v2"
    assert final.metrics.final == {"em": 0.4}
    assert run.info is final
    assert scripted.paths()[1:] == ["GET /admin/runs/r1"] * 3
    bar = capsys.readouterr().err
    assert "run r1 (covid)" in bar and "4/4" in bar
    assert "loss=0.75" in bar and "state=succeeded" in bar


def test_async_wait_polls_until_succeeded(scripted):
    play(scripted, LIFE)

    async def main():
        async with AsyncClient(scripted.url, admin_token="t") as client:
            run = await client.runs.create("covid")
            return await run.wait(progress=False, poll_interval=0.01, max_poll_interval=0.05)

    assert asyncio.run(main()).state == "succeeded"


def test_polling_backs_off_while_nothing_changes(scripted):
    play(scripted, [_run(state="running", step=1)] * 6 + [LIFE[-1]])
    with Client(scripted.url, admin_token="t") as client:
        client.runs.create("covid").wait(progress=False, poll_interval=0.02, max_poll_interval=0.2)
    polls = [r.time for r in scripted.received[1:]]
    gaps = [b - a for a, b in itertools.pairwise(polls)]
    assert gaps[-1] > 2 * gaps[0]  # 0.02 grows by 1.5x per unchanged poll


def test_a_failed_run_raises_with_its_error_code(scripted):
    play(scripted, [_run(state="failed", step=2, error="CUDA out of memory", error_code="out_of_memory")])
    with Client(scripted.url, admin_token="t") as client, pytest.raises(RunFailedError) as caught:
        client.runs.create("covid").wait(progress=False, poll_interval=0.01)
    error = caught.value
    assert error.code == "out_of_memory" and error.detail == "CUDA out of memory"
    assert error.run.step == 2 and "failed at step 2" in str(error)


def test_a_cancelled_run_raises_run_cancelled(scripted):
    play(scripted, [_run(state="running", step=1), _run(state="cancelled", step=1)])
    with Client(scripted.url, admin_token="t") as client, pytest.raises(RunCancelledError) as caught:
        client.runs.create("covid").wait(progress=False, poll_interval=0.01)
    assert caught.value.run.state == "cancelled"


def test_wait_gives_up_after_its_timeout(scripted):
    play(scripted, [_run(state="running", step=1)])
    with Client(scripted.url, admin_token="t") as client:
        run = client.runs.create("covid")
        with pytest.raises(WaitTimeoutError) as caught:
            run.wait(progress=False, timeout=0.3, poll_interval=0.05, max_poll_interval=0.05)
    assert isinstance(caught.value, TimeoutError) and "r1" in str(caught.value)
    assert run.info.state == "running"


def test_events_yield_only_new_events_across_pages(scripted):
    play(scripted, LIFE, EVENTS, page=2)
    with Client(scripted.url, admin_token="t") as client:
        run = client.runs.attach("r1")
        first = list(run.events())
        again = list(run.events())
    assert [e.seq for e in first] == [1, 2, 3, 4, 5]
    assert again == []
    assert first[2].kind == "rebuild" and first[2].index_version == "i2"
    after = [parse_qs(urlsplit(r.path).query)["after"][0] for r in scripted.received if "events" in r.path]
    assert after[:3] == ["0", "2", "4"]


def test_events_resume_after_the_last_one_seen(scripted):
    play(scripted, LIFE, EVENTS, page=10)
    with Client(scripted.url, admin_token="t") as client:
        run = client.runs.attach("r1")
        for event in run.events():
            if event.seq == 2:
                break
        rest = [e.seq for e in run.events()]
    assert rest == [3, 4, 5]


def test_events_follow_until_the_run_finished(scripted):
    life = [_run(state="running", step=1), _run(state="running", step=1), LIFE[-1]]
    play(scripted, life, EVENTS, page=2)

    async def main():
        async with AsyncClient(scripted.url, admin_token="t") as client:
            run = await client.runs.attach("r1")
            return [event.seq async for event in run.events(follow=True, poll_interval=0.01)]

    assert asyncio.run(main()) == [1, 2, 3, 4, 5]


def test_cancel_of_a_finished_run_conflicts(scripted, using):
    scripted.script = [Reply.problem(409, "run_finished", "run r1 already succeeded")]
    with pytest.raises(ConflictError) as caught:
        using(scripted.url, lambda client: client.runs.cancel("r1"), admin_token="t")
    assert caught.value.code == "run_finished"
    assert scripted.paths() == ["POST /admin/runs/r1/cancel"]

"""The SDK against the real service on loopback (tiny random models, local store): every call a user makes,
and the typed errors the service's problems turn into."""

from __future__ import annotations

import asyncio
import json

import pytest

from ragadapt_client import (
    AsyncClient,
    AuthenticationError,
    Client,
    ConflictError,
    NotFoundError,
    RunCancelledError,
    UnprocessableEntityError,
)

from conftest import PASSAGES, TINY_RUN


def test_health_and_readiness(live_server, using):
    assert using(live_server.url, lambda client: client.health()).status == "alive"
    ready = using(live_server.url, lambda client: client.ready())
    assert ready.status == "ready" and ready.backbone and ready.store == "local"


def test_created_domain_is_listed_with_its_live_index(live_server, tiny_domain, using):
    domains = using(live_server.url, lambda client: client.domains.list())
    assert tiny_domain in [d.name for d in domains]
    info = using(live_server.url, lambda client: client.domains.get(tiny_domain))
    assert info.description == "three facts"
    assert info.passages == len(PASSAGES)
    assert info.retrieval == "dense"
    assert info.live.adapter_version is None  # served by the base backbone until an adapter is promoted
    assert info.live.index_version == info.versions.indexes[0].version
    assert info.versions.indexes[0].passages == len(PASSAGES)


def test_ask_answers_from_the_live_index(live_server, tiny_domain, using):
    answer = using(
        live_server.url,
        lambda client: client.ask(tiny_domain, "what is the incubation period", top_k=2, max_new_tokens=4),
        api_key=live_server.api_key,
    )
    live = using(live_server.url, lambda client: client.domains.get(tiny_domain))
    assert answer.domain == tiny_domain
    assert answer.adapter_version is None and answer.index_version == live.live.index_version
    assert isinstance(answer.answer, str)
    assert len(answer.passages) == 2
    assert {p.id for p in answer.passages} <= {p["id"] for p in PASSAGES}
    assert answer.timings.generate is not None and answer.timings.generate > 0


def test_ask_without_passages(live_server, tiny_domain, using):
    answer = using(
        live_server.url,
        lambda client: client.ask(
            tiny_domain, "what is the capital of france", max_new_tokens=2, return_passages=False
        ),
        api_key=live_server.api_key,
    )
    assert answer.passages == []


def test_ask_without_api_key_is_an_authentication_error(live_server, tiny_domain, using):
    with pytest.raises(AuthenticationError) as caught:
        using(live_server.url, lambda client: client.ask(tiny_domain, "what is the capital of france"))
    error = caught.value
    assert error.status == 401 and error.code == "unauthorized"
    # The id the client sent is the one the server logged and answered with.
    assert error.request_id == error.response.request.headers["X-Request-ID"]
    assert error.request_id == error.response.headers["X-Request-ID"]


def test_ask_unknown_domain_is_not_found(live_server, using):
    with pytest.raises(NotFoundError) as caught:
        using(
            live_server.url,
            lambda client: client.ask("nowhere", "what is the capital of france"),
            api_key=live_server.api_key,
        )
    assert caught.value.code == "domain_not_found"


def test_ask_out_of_range_is_unprocessable(live_server, tiny_domain, using):
    with pytest.raises(UnprocessableEntityError) as caught:
        using(
            live_server.url,
            lambda client: client.ask(tiny_domain, "what", top_k=0),
            api_key=live_server.api_key,
        )
    assert caught.value.code == "invalid_request"
    assert "top_k" in caught.value.detail


def test_admin_call_with_wrong_token_is_an_authentication_error(live_server, using):
    with pytest.raises(AuthenticationError) as caught:
        using(live_server.url, lambda client: client.jobs.get("0123456789abcdef"), admin_token="wrong")
    assert caught.value.code == "unauthorized"


def test_unknown_job_is_not_found(live_server, using):
    with pytest.raises(NotFoundError) as caught:
        using(
            live_server.url,
            lambda client: client.jobs.get("0123456789abcdef"),
            admin_token=live_server.admin_token,
        )
    assert caught.value.code == "job_not_found"


def test_creating_an_existing_domain_conflicts(live_server, tiny_domain, using):
    with pytest.raises(ConflictError) as caught:
        using(
            live_server.url,
            lambda client: client.domains.create(tiny_domain, PASSAGES),
            admin_token=live_server.admin_token,
        )
    assert caught.value.code == "domain_exists"


def test_malformed_passages_name_the_line(live_server, tmp_path, using):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(PASSAGES[0]) + "\n{not json\n")
    with pytest.raises(UnprocessableEntityError) as caught:
        using(
            live_server.url,
            lambda client: client.domains.create("broken", bad),
            admin_token=live_server.admin_token,
        )
    assert caught.value.code == "invalid_passages"
    assert caught.value.problem["line"] == 2
    with pytest.raises(NotFoundError):  # nothing was created
        using(live_server.url, lambda client: client.domains.get("broken"))


def test_promoting_an_unknown_version_is_not_found(live_server, tiny_domain, using):
    with pytest.raises(NotFoundError) as caught:
        using(
            live_server.url,
            lambda client: client.domains.promote(tiny_domain, "20260101T000000Z-abcdef"),
            admin_token=live_server.admin_token,
        )
    assert caught.value.code in ("version_not_found", "adapter_version_not_found")


def test_async_client_creates_a_domain_from_a_jsonl_file_and_asks_it(live_server, tmp_path, capsys):
    path = tmp_path / "passages.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PASSAGES[:2]))

    async def main():
        async with AsyncClient(
            live_server.url, admin_token=live_server.admin_token, api_key=live_server.api_key
        ) as client:
            job = await client.domains.create("from-file", path, description="two facts", retrieval="bm25")
            assert job.domain == "from-file" and job.info.kind == "ingest"
            done = await job.wait(progress=True, timeout=300)
            info = await client.domains.get("from-file")
            answer = await client.ask("from-file", "what is the capital of france", max_new_tokens=2)
            return done, info, answer

    done, info, answer = asyncio.run(main())
    assert done.state == "succeeded" and done.progress == 1.0
    assert done.result["passages"] == 2
    assert info.passages == 2 and info.retrieval == "bm25"
    assert info.live.index_version == done.result["index_version"] == answer.index_version
    assert answer.passages[0].id == "geo-1"  # BM25 finds the only passage sharing the question's words
    bar = capsys.readouterr().err
    assert "ingest from-file" in bar and "100/100%" in bar and "state=succeeded" in bar


def test_a_run_trains_promotes_and_serves_its_adapter(live_server, tiny_domain, capsys):
    with Client(live_server.url, admin_token=live_server.admin_token, api_key=live_server.api_key) as client:
        run = client.runs.create(
            tiny_domain,
            mode="generator_only",
            promote="always",
            hyperparameters={**TINY_RUN, "checkpoint_every": 1},
            metadata={"by": "sdk"},
        )
        final = run.wait(progress=True, timeout=300, poll_interval=0.1, max_poll_interval=0.5)
        try:
            assert final.state == "succeeded" and final.promoted and final.metadata == {"by": "sdk"}
            assert final.step == final.total_steps == 2 and final.latest.loss is not None
            assert final.metrics.base is not None and final.metrics.final is not None
            checkpoints = run.checkpoints()
            assert [c.step for c in checkpoints] == [1] and checkpoints[0].adapter_version
            assert client.runs.checkpoints(run.id) == checkpoints
            page = client.runs.events(run.id, 0, limit=2)
            assert [e.seq for e in page.events] == [1, 2] and page.next == 2 and page.has_more
            events = list(run.events())
            assert [e.seq for e in events] == list(range(1, len(events) + 1))
            assert [e.step for e in events if e.kind == "step"] == [1, 2]
            assert events[-1].kind == "state" and events[-1].state == "succeeded"

            info = client.domains.get(tiny_domain)
            assert info.live.adapter_version == final.adapter_version
            assert info.last_run is not None and info.last_run.id == run.id
            assert any(
                a.version == final.adapter_version and a.run_id == run.id for a in info.versions.adapters
            )
            answer = client.ask(tiny_domain, "what is the capital of france", max_new_tokens=2)
            assert answer.adapter_version == final.adapter_version
            assert run.id in [r.id for r in client.runs.list(domain=tiny_domain)]

            with pytest.raises(ConflictError) as caught:
                run.cancel()
            assert caught.value.code == "run_finished"
        finally:
            back = client.domains.rollback(tiny_domain)
        assert back.live.adapter_version is None
        answer = client.ask(tiny_domain, "what is the capital of france", max_new_tokens=2)
        assert answer.adapter_version is None
    bar = capsys.readouterr().err
    assert f"run {run.id} (tiny)" in bar and "2/2" in bar and "loss=" in bar and "state=succeeded" in bar


def test_promote_and_rollback_move_the_live_adapter(live_server, tiny_domain):
    with Client(live_server.url, admin_token=live_server.admin_token) as client:
        run = client.runs.create(
            tiny_domain, mode="generator_only", promote="never", hyperparameters=TINY_RUN
        )
        final = run.wait(progress=False, timeout=300, poll_interval=0.1)
        before = client.domains.get(tiny_domain)
        assert not final.promoted and before.live.adapter_version is None
        promoted = client.domains.promote(tiny_domain, final.adapter_version, expected_etag=before.etag)
        assert promoted.live.adapter_version == final.adapter_version and promoted.etag != before.etag
        with pytest.raises(ConflictError) as caught:  # promoted since `before` was read
            client.domains.promote(tiny_domain, final.adapter_version, expected_etag=before.etag)
        assert caught.value.code == "version_conflict"
        assert client.domains.rollback(tiny_domain).live.adapter_version is None


def test_async_cancel_ends_a_long_run_as_cancelled(live_server, tiny_domain):
    async def main():
        async with AsyncClient(live_server.url, admin_token=live_server.admin_token) as client:
            run = await client.runs.create(
                tiny_domain,
                mode="generator_only",
                promote="never",
                hyperparameters={**TINY_RUN, "steps": 100_000},
            )
            cancelled = await run.cancel()
            with pytest.raises(RunCancelledError) as caught:
                await run.wait(progress=False, timeout=300, poll_interval=0.1, max_poll_interval=0.5)
            events = [event async for event in run.events(follow=True, poll_interval=0.1)]
            listed = await client.runs.get(run.id)
            return cancelled, caught.value, events, listed

    cancelled, error, events, listed = asyncio.run(main())
    assert cancelled.cancel_requested or cancelled.state == "cancelled"
    assert error.code == "run_cancelled" and error.run.state == "cancelled"
    assert error.run.step < 100_000 and listed.state == "cancelled"
    assert events[-1].kind == "state" and events[-1].state == "cancelled"


def test_a_domain_is_rebuilt_then_deleted(live_server):
    with Client(live_server.url, admin_token=live_server.admin_token, api_key=live_server.api_key) as client:
        first = client.domains.create("short-lived", PASSAGES).wait(
            progress=False, timeout=300, poll_interval=0.1
        )
        job = client.domains.rebuild("short-lived")
        assert job.info.kind == "rebuild"
        with pytest.raises(ConflictError) as caught:
            client.domains.rebuild("short-lived")
        assert caught.value.code == "build_in_progress"
        again = job.wait(progress=False, timeout=300, poll_interval=0.1)
        assert again.result["index_version"] != first.result["index_version"]
        assert client.domains.get("short-lived").live.index_version == again.result["index_version"]
        assert client.domains.delete("short-lived") is None
        with pytest.raises(NotFoundError):
            client.domains.get("short-lived")

    async def gone_again():
        async with AsyncClient(live_server.url, admin_token=live_server.admin_token) as client:
            await (await client.domains.create("short-lived", PASSAGES)).wait(progress=False, timeout=300)
            await client.domains.delete("short-lived")
            with pytest.raises(NotFoundError) as caught:
                await client.domains.delete("short-lived")
            return caught.value

    assert asyncio.run(gone_again()).code == "domain_not_found"


def test_gc_is_a_dry_run_unless_applied(live_server, tiny_domain, using):
    report = using(
        live_server.url, lambda client: client.gc(keep_last=1000), admin_token=live_server.admin_token
    )
    assert report.dry_run and report.keep_last == 1000 and report.versions == []

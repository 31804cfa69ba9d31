"""Configuration from arguments and RAGADAPT_* variables, and which credentials go on which call."""

from __future__ import annotations

import json

import httpx
import pytest

from ragadapt_client import APITimeoutError, Client, NotFoundError

from scripted import Reply

ANSWER = {
    "answer": "paris",
    "domain": "geo",
    "adapter_version": "v1",
    "index_version": "i1",
    "passages": [],
    "timings": {"queue": 0.0, "embed": 0.0, "search": 0.0, "generate": 0.1},
}
JOB = {
    "id": "j1",
    "kind": "ingest",
    "domain": "geo",
    "state": "pending",
    "progress": 0.0,
    "error": None,
    "result": None,
}


def test_environment_supplies_url_and_credentials(scripted, using, monkeypatch):
    monkeypatch.setenv("RAGADAPT_URL", scripted.url)
    monkeypatch.setenv("RAGADAPT_ADMIN_TOKEN", "env-admin")
    monkeypatch.setenv("RAGADAPT_API_KEY", "env-key")
    scripted.script = [Reply(200, ANSWER), Reply(200, JOB)]
    using(None, lambda client: client.ask("geo", "capital of france?"))
    using(None, lambda client: client.jobs.get("j1"))
    ask, job = scripted.received
    assert ask.headers["x-api-key"] == "env-key" and "authorization" not in ask.headers
    assert job.headers["authorization"] == "Bearer env-admin" and "x-api-key" not in job.headers


def test_arguments_win_over_the_environment(scripted, using, monkeypatch):
    monkeypatch.setenv("RAGADAPT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("RAGADAPT_ADMIN_TOKEN", "env-admin")
    scripted.script = [Reply(200, JOB)]
    using(scripted.url, lambda client: client.jobs.get("j1"), admin_token="arg-admin")
    assert scripted.received[0].headers["authorization"] == "Bearer arg-admin"


def test_no_credentials_means_no_auth_headers(scripted, using, monkeypatch):
    for name in ("RAGADAPT_ADMIN_TOKEN", "RAGADAPT_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    scripted.script = [Reply(200, ANSWER)]
    using(scripted.url, lambda client: client.ask("geo", "q"))
    headers = scripted.received[0].headers
    assert "authorization" not in headers and "x-api-key" not in headers
    assert headers["user-agent"].startswith("ragadapt-client/")


def test_ask_sends_only_the_options_given(scripted, using):
    scripted.script = [Reply(200, ANSWER), Reply(200, ANSWER)]
    using(scripted.url, lambda client: client.ask("geo", "q"))
    using(
        scripted.url,
        lambda client: client.ask(
            "geo", "q", top_k=3, max_new_tokens=8, retrieval="hybrid", return_passages=False
        ),
    )
    first, second = (json.loads(r.body) for r in scripted.received)
    assert first == {"question": "q"}
    assert second == {
        "question": "q",
        "top_k": 3,
        "max_new_tokens": 8,
        "retrieval": "hybrid",
        "return_passages": False,
    }


def test_path_segments_are_escaped(scripted, using):
    scripted.script = [Reply.problem(404, "domain_not_found")]
    with pytest.raises(NotFoundError):
        using(scripted.url, lambda client: client.domains.get("a/b c"))
    assert scripted.received[0].path == "/domains/a%2Fb%20c"


def test_timeout_from_the_environment(scripted, monkeypatch):
    monkeypatch.setenv("RAGADAPT_TIMEOUT", "0.2")
    scripted.script = [Reply(200, {"status": "alive"}, delay=0.6)]
    with Client(scripted.url, max_retries=0) as client, pytest.raises(APITimeoutError) as caught:
        client.health()
    assert isinstance(caught.value.__cause__, httpx.ReadTimeout)


def test_base_url_must_be_http():
    with pytest.raises(ValueError, match="http"):
        Client("localhost:8080")

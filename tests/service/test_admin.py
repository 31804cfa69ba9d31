"""The admin loop through HTTP only: upload a domain, wait for its index, adapt it, and serve the promoted
adapter without a restart."""

from __future__ import annotations

import json
import time

import httpx

from tests.service.support import ADMIN, QUESTIONS, TOPICS, serve

QA = [
    {"question": "what is the capital of france", "answers": ["paris"], "passage_ids": ["paris-0"]},
    {"question": "what is the capital of italy", "answers": ["rome"], "passage_ids": ["rome-0"]},
    {"question": "what was the revenue in 2020", "answers": ["51 million"], "passage_ids": ["revenue-0"]},
    {"question": "who was on a break", "answers": ["ross and rachel"], "passage_ids": ["friends-0"]},
    {"question": "how long is the incubation period", "answers": ["five days"], "split": "dev"},
]
ASK = {"question": QUESTIONS[0], "top_k": 2, "max_new_tokens": 4}


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def _until(client: httpx.Client, path: str, done, timeout: float = 240.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(path, headers=ADMIN).json()
        if done(body):
            return body
        assert time.monotonic() < deadline, f"{path} still {body} after {timeout}s"
        time.sleep(0.5)


def test_upload_ingest_adapt_and_serve_the_promoted_adapter(store_settings, make_settings):
    settings = make_settings(store_settings, runs={"max_concurrent": 1})
    passages = [
        {"id": f"{title.lower()}-{i}", "title": title, "text": f"{text} note {i}"}
        for i in range(2)
        for title, text in TOPICS
    ]
    with serve(settings) as served, served.client() as client:
        created = client.post(
            "/admin/domains",
            headers=ADMIN,
            data={"name": "toy", "description": "tiny", "retrieval": "hybrid"},
            files={"passages": ("passages.jsonl", _jsonl(passages)), "qa": ("qa.jsonl", _jsonl(QA))},
        )
        assert created.status_code == 202, created.text
        job = created.json()["job"]
        assert created.json()["domain"] == "toy" and job["kind"] == "ingest"
        assert client.post("/ask?domain=toy", json={"question": "what"}).json()["code"] == "index_not_ready"

        job = _until(client, f"/admin/jobs/{job['id']}", lambda j: j["state"] in ("succeeded", "failed"))
        assert job["state"] == "succeeded", job
        assert job["progress"] == 1.0 and job["result"]["passages"] == len(passages)
        domain = client.get("/domains/toy").json()
        assert domain["passages"] == len(passages) and domain["retrieval"] == "hybrid"
        assert domain["live"]["index_version"] == job["result"]["index_version"]
        base = client.post("/ask?domain=toy", json=ASK)
        assert base.status_code == 200 and base.json()["adapter_version"] is None

        run = client.post(
            "/admin/adapt",
            headers=ADMIN,
            json={
                "domain": "toy",
                "mode": "generator_only",
                "promote": "always",
                "evaluation": None,
                "metadata": {"purpose": "test"},
                "hyperparameters": {
                    "steps": 2,
                    "batch_size": 2,
                    "top_k": 2,
                    "lr": 0.01,
                    "checkpoint_every": 1,
                },
            },
        )
        assert run.status_code == 202, run.text
        run_id = run.json()["id"]
        assert run.json()["state"] == "queued" and run.json()["metadata"] == {"purpose": "test"}
        assert run_id in [r["id"] for r in client.get("/admin/runs", headers=ADMIN).json()["runs"]]

        run = _until(
            client, f"/admin/runs/{run_id}", lambda r: r["state"] in ("succeeded", "failed", "cancelled")
        )
        assert run["state"] == "succeeded" and run["promoted"], run
        first = client.get(f"/admin/runs/{run_id}/events", headers=ADMIN, params={"limit": 2}).json()
        assert len(first["events"]) == 2 and first["has_more"] and first["next"] == 2
        events = client.get(f"/admin/runs/{run_id}/events", headers=ADMIN, params={"after": 2}).json()
        assert events["events"][0]["seq"] == 3 and events["next"] == events["events"][-1]["seq"]
        later = client.get(
            f"/admin/runs/{run_id}/events", headers=ADMIN, params={"after": events["next"]}
        ).json()
        assert later == {"events": [], "next": events["next"], "has_more": False}
        checkpoints = client.get(f"/admin/runs/{run_id}/checkpoints", headers=ADMIN).json()["checkpoints"]
        assert [c["step"] for c in checkpoints] == [1] and checkpoints[0]["adapter_version"]
        finished = client.post(f"/admin/runs/{run_id}/cancel", headers=ADMIN)
        assert finished.status_code == 409 and finished.json()["code"] == "run_finished"

        # The run promoted through the store; the poller brings the new adapter into service, no restart.
        deadline = time.monotonic() + 30
        while True:
            answer = client.post("/ask?domain=toy", json=ASK)
            assert answer.status_code == 200, answer.text
            if answer.json()["adapter_version"] == run["adapter_version"]:
                break
            assert time.monotonic() < deadline, "the promoted adapter never came into service"
            time.sleep(0.3)
        assert client.get("/domains/toy").json()["last_run"]["id"] == run_id

        # A checkpoint is an adapter version like any other: it can be promoted, and then it answers.
        promoted = client.post(
            "/admin/domains/toy/promote", headers=ADMIN, json={"version": checkpoints[0]["adapter_version"]}
        )
        assert promoted.status_code == 200, promoted.text
        answer = client.post("/ask?domain=toy", json=ASK).json()
        assert answer["adapter_version"] == checkpoints[0]["adapter_version"]

        unknown = client.post("/admin/adapt", headers=ADMIN, json={"domain": "nosuch"})
        assert unknown.status_code == 404 and unknown.json()["code"] == "domain_not_found"
        invalid = client.post(
            "/admin/adapt", headers=ADMIN, json={"domain": "toy", "promote": "if_better", "evaluation": None}
        )
        assert invalid.status_code == 422 and invalid.json()["code"] == "invalid_run"

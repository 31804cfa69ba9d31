"""A real Prometheus server scrapes the live service while it answers, builds, trains and swaps adapters, and
every query of the Grafana dashboard, evaluated through Prometheus's HTTP API, returns data.

Prometheus comes from the Debian package (`make test` installs it); the test starts its own on loopback."""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import time

import httpx
import pytest

from tests.deploy.test_dashboard import DASHBOARD, dashboard_queries
from tests.service.support import ADMIN, ADMIN_TOKEN, publish_adapter, serve

# What Grafana substitutes for the dashboard's variables with everything selected.
VARIABLES = {
    "$__rate_interval": "1m",
    "$__range": "1h",
    "$domain": ".*",
    "$stage": "queue|embed|search|generate",
}
PASSAGES = [
    {"id": f"p{i}", "title": title, "text": text}
    for i, (title, text) in enumerate(
        [
            ("covid", "the incubation period of covid is five days"),
            ("geo", "the capital of france is paris and the river is the seine"),
            ("finance", "the company revenue was 42 million dollars in 2019"),
        ]
    )
]
QUESTIONS = ["what is the incubation period", "what is the capital of france", "what was the revenue"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_backbone_settings, direct_backbone):
    """The service with one hot adapter slot and a tiny warm tier, so adapter sets are loaded and evicted."""
    from service.settings import Settings

    root = tmp_path_factory.mktemp("prometheus-service")
    settings = Settings(
        data_dir=root / "data",
        backbone=tiny_backbone_settings,
        demo={"enabled": False},
        store={"backend": "local", "root": root / "store"},
        runs={"max_concurrent": 1},
        cache={"hot_slots": 1, "warm_bytes": 0},
        server={"port": 0, "admin_token": ADMIN_TOKEN, "poll_interval_s": 0.2},
    )
    with serve(settings) as served:
        yield served, root


@pytest.fixture(scope="module")
def prometheus(service, tmp_path_factory):
    """Prometheus on a free loopback port, scraping the service every second."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError(
            "the prometheus binary is missing: `make test` installs the Debian package "
            "(apt-get install prometheus)"
        )
    served, _ = service
    root = tmp_path_factory.mktemp("prometheus")
    target = served.url.removeprefix("http://")
    (root / "prometheus.yml").write_text(
        json.dumps(
            {  # YAML is a superset of JSON
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {
                        "job_name": "ragadapt",
                        "metrics_path": "/metrics",
                        "static_configs": [{"targets": [target]}],
                    }
                ],
            }
        )
    )
    port = _free_port()
    with open(root / "prometheus.log", "w") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={root / 'prometheus.yml'}",
                f"--storage.tsdb.path={root / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                log_tail = (root / "prometheus.log").read_text()[-3000:]
                raise RuntimeError(f"prometheus did not start:\n{log_tail}")
            time.sleep(0.2)
        # Ready is not scraped: Prometheus applies its first target list a few seconds after start-up, and a
        # histogram whose first sample already counts the ingest never shows that ingest in a rate.
        while not _scraped(url):
            if process.poll() is not None or time.monotonic() > deadline:
                log_tail = (root / "prometheus.log").read_text()[-3000:]
                raise RuntimeError(f"prometheus never scraped the service:\n{log_tail}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(30)


def _scraped(url: str) -> bool:
    try:
        result = httpx.get(f"{url}/api/v1/query", params={"query": "up"}, timeout=2).json()["data"]["result"]
    except (httpx.TransportError, KeyError, ValueError):
        return False
    return any(sample["value"][1] == "1" for sample in result)


@pytest.fixture(scope="module")
def traffic(service, prometheus, direct_backbone):
    """Build a domain, train on it, swap adapters and ask questions for a while, scraped all along."""
    served, root = service
    with served.client() as client:
        answers = [("five days", "train"), ("paris", "train"), ("42", "dev")]
        qa = [
            {"question": question, "answers": [answer], "split": split}
            for question, (answer, split) in zip(QUESTIONS, answers)
        ]
        created = client.post(
            "/admin/domains", headers=ADMIN, json={"name": "dash", "passages": PASSAGES, "qa": qa}
        )
        assert created.status_code == 202, created.text
        _wait(client, f"/admin/jobs/{created.json()['job']['id']}", {"succeeded"})
        run = client.post(
            "/admin/adapt",
            headers=ADMIN,
            json={
                "domain": "dash",
                "mode": "generator_only",
                "promote": "never",
                "hyperparameters": {"steps": 3, "batch_size": 1, "top_k": 2, "eval_max_new_tokens": 2},
            },
        )
        assert run.status_code == 202, run.text
        store = served.runtime.store
        versions = [
            publish_adapter(store, direct_backbone, "dash", seed, root / "adapters") for seed in (1, 2)
        ]
        deadline = time.monotonic() + 20  # long enough for rates over several scrapes
        turn = 0
        while time.monotonic() < deadline or turn < 10:
            if turn % 3 == 0:  # swap the live adapter: one hot slot, no warm room: loads and evictions
                version = versions[(turn // 3) % 2]
                assert (
                    client.post(
                        "/admin/domains/dash/promote", headers=ADMIN, json={"version": version}
                    ).status_code
                    == 200
                )
            answer = client.post(
                "/ask",
                params={"domain": "dash"},
                json={"question": QUESTIONS[turn % 3], "max_new_tokens": 3, "top_k": 2},
            )
            assert answer.status_code == 200, answer.text
            missing = client.post("/ask", params={"domain": "missing"}, json={"question": "x"})
            assert missing.status_code == 404
            turn += 1
            time.sleep(0.2)
        _wait(client, f"/admin/runs/{run.json()['id']}", {"succeeded"})
    time.sleep(3)  # a few scrapes after the last requests


def _wait(client: httpx.Client, path: str, states: set[str], timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while (body := client.get(path, headers=ADMIN).json())["state"] not in {*states, "failed", "cancelled"}:
        assert time.monotonic() < deadline, f"{path}: still {body}"
        time.sleep(0.2)
    assert body["state"] in states, body
    return body


def _grafana(expr: str) -> str:
    for variable, value in VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def test_every_dashboard_query_returns_data_from_a_real_prometheus(prometheus, traffic):
    targets = httpx.get(f"{prometheus}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    assert [target["health"] for target in targets] == ["up"], targets
    queries = dashboard_queries(json.loads(DASHBOARD.read_text()))
    assert len(queries) >= 20
    empty, unanswered = [], []
    for where, expr in queries:
        response = httpx.get(f"{prometheus}/api/v1/query", params={"query": _grafana(expr)}, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", (where, body)
        results = body["data"]["result"]
        if not results:
            empty.append(f"{where}: {expr}")
        elif not any(math.isfinite(float(sample["value"][1])) for sample in results):
            unanswered.append(f"{where}: {results}")
    assert not empty, "dashboard queries Prometheus answered with no data:\n" + "\n".join(empty)
    assert not unanswered, "dashboard queries with no finite value:\n" + "\n".join(unanswered)

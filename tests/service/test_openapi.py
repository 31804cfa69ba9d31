"""The served OpenAPI document is the contract clients and fuzzers read: schemathesis 4, with every check and
every phase (examples, coverage, fuzzing and the stateful phase that follows the document's links), runs
against a real server and finds nothing. The exceptions it is configured with are in schemathesis.toml, each
with the reason JSON Schema cannot state it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from adapters.qa import QaExample, QaSets
from service.settings import Settings
from storage import open_store
from tests.service.support import ADMIN, ADMIN_TOKEN, ingest_domain, publish_adapter, serve

API_KEY = "fuzz-api-key"
CONFIG = Path(__file__).with_name("schemathesis.toml")
# Every operation the service serves; a new one must be added here (and so gets fuzzed).
OPERATIONS = {
    "POST /ask",
    "GET /domains",
    "GET /domains/{name}",
    "POST /admin/domains",
    "GET /admin/jobs/{job_id}",
    "POST /admin/domains/{name}/promote",
    "POST /admin/domains/{name}/rollback",
    "POST /admin/domains/{name}/rebuild",
    "DELETE /admin/domains/{name}",
    "POST /admin/gc",
    "POST /admin/adapt",
    "GET /admin/runs",
    "GET /admin/runs/{run_id}",
    "GET /admin/runs/{run_id}/events",
    "GET /admin/runs/{run_id}/checkpoints",
    "POST /admin/runs/{run_id}/cancel",
    "GET /healthz",
    "GET /readyz",
    "GET /metrics",
}


@pytest.fixture(scope="module")
def api(tmp_path_factory, tiny_backbone_settings, direct_backbone):
    """A server with a domain (QA set and an adapter version), the admin token and an API key."""
    root = tmp_path_factory.mktemp("openapi")
    settings = Settings(
        data_dir=root / "data",
        backbone=tiny_backbone_settings,
        demo={"enabled": False},
        runs={"max_concurrent": 0},
        store={"backend": "local", "root": root / "store"},
        server={"port": 0, "admin_token": ADMIN_TOKEN, "api_keys": [API_KEY], "request_timeout_s": 30},
    )
    store = open_store(settings.store_config)
    ingest_domain(store, direct_backbone, "alpha", root / "corpus")
    qa = [
        QaExample("what is the capital of france", ("paris",), (), "train"),
        QaExample("what is the river of rome", ("tiber",), (), "dev"),
    ]
    QaSets(store).publish("alpha", qa, source="test")
    publish_adapter(store, direct_backbone, "alpha", 3, root / "adapters")
    with serve(settings) as served:
        yield served


@pytest.fixture(scope="module")
def document(api) -> dict:
    return httpx.get(f"{api.url}/schema/openapi.json", timeout=30).json()


def test_bodies_and_names_are_stated_exactly(document):
    schemas = document["components"]["schemas"]
    for name in (
        "AskRequest",
        "CreateDomainRequest",
        "PromoteRequest",
        "RunRequest",
        "Hyperparameters",
        "LoraConfig",
        "QaSource",
        "GcRequest",
    ):
        assert schemas[name]["additionalProperties"] is False, name
    assert (
        schemas["AskRequest"]["properties"]["top_k"] | {"minimum": 1, "maximum": 20}
        == schemas["AskRequest"]["properties"]["top_k"]
    )
    pattern = "^[a-z0-9][a-z0-9_-]{0,62}$"
    assert schemas["CreateDomainRequest"]["properties"]["name"]["pattern"] == pattern
    parameters = document["paths"]["/domains/{name}"]["get"]["parameters"]
    assert parameters[0]["schema"]["pattern"] == pattern
    assert document["paths"]["/admin/adapt"]["post"]["security"] == [{"adminToken": []}]
    links = document["paths"]["/admin/domains"]["post"]["responses"]["202"]["links"]
    assert {"GetJob", "Ask"} <= set(links)


def test_schemathesis_finds_nothing_with_every_check_and_phase(api, tmp_path):
    report = tmp_path / "report.json"
    command = [
        str(Path(sys.executable).parent / "st"),
        "--config-file",
        str(CONFIG),
        "run",
        f"{api.url}/schema/openapi.json",
        "--checks",
        "all",
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--max-examples",
        "40",
        "--workers",
        "1",
        "--seed",
        "20261201",
        "--request-timeout",
        "60",
        "--no-color",
        "-H",
        f"Authorization: {ADMIN['Authorization']}",
        "-H",
        f"X-API-Key: {API_KEY}",
        "--report",
        "json",
        "--report-json-path",
        str(report),
    ]
    # From a scratch directory: schemathesis keeps a cache of what it found in the working directory.
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    summary = json.loads(report.read_text())
    assert done.returncode == 0 and not summary["failures"] and not summary["errors"], done.stdout[-8000:]
    assert summary["operations"]["tested"] == len(OPERATIONS) == summary["operations"]["total"]
    assert {phase: result["status"] for phase, result in summary["phases"].items()} == {
        "examples": "success",
        "coverage": "success",
        "fuzzing": "success",
        "stateful": "success",
    }
    assert summary["test_cases"]["generated"] > 500
    answered = api.runtime.metrics.registry.get_sample_value(
        "ragadapt_ask_requests_total", {"domain": "alpha", "code": "ok"}
    )
    assert answered and answered > 0  # valid questions really were answered, not all refused


def test_every_served_operation_is_listed(document):
    served = {
        f"{method.upper()} {path}"
        for path, operations in document["paths"].items()
        for method in operations
        if method in ("get", "post", "put", "delete", "patch")
    }
    assert served == OPERATIONS

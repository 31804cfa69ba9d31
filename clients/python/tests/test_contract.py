"""The SDK against the contract the live service publishes (``/schema/openapi.json``): it calls only
documented operations, reads every field the service guarantees, and sends only fields the service accepts."""

from __future__ import annotations

import re

import httpx
import pytest
from pydantic import BaseModel

from ragadapt_client import endpoints, models

# SDK model -> the service's schema component.
RESPONSES = {
    models.Answer: "AskResponse",
    models.Passage: "PassageOut",
    models.Timings: "Timings",
    models.DomainInfo: "DomainInfo",
    models.LiveState: "LiveInfo",
    models.DomainVersions: "DomainVersions",
    models.AdapterVersion: "AdapterVersionInfo",
    models.IndexVersion: "IndexVersionInfo",
    models.JobInfo: "JobInfo",
    models.DomainCreated: "CreateDomainResponse",
    models.RunInfo: "RunInfo",
    models.RunEvents: "RunEvents",
    models.Health: "Health",
    models.Readiness: "Ready",
    models.RunWorkers: "RunWorkers",
    models.Checkpoint: "Checkpoint",
    models.GcReport: "GcReport",
}
REQUESTS = {
    models.Hyperparameters: "Hyperparameters",
    models.LoraSpec: "LoraConfig",
    models.LoraSpecs: "AdapterSetConfig",
    models.RunResources: "RunResources",
}

CALLS = [
    endpoints.health(),
    endpoints.ready(),
    endpoints.ask("d", "q", None, None, None, None),
    endpoints.list_domains(),
    endpoints.get_domain("d"),
    endpoints.create_domain("d", [{"id": "p", "text": "t"}], None, None, None, None),
    endpoints.create_domain("d", None, "passages/d.jsonl", None, None, None),
    endpoints.get_job("j"),
    endpoints.promote("d", "v", None),
    endpoints.rollback("d", None),
    endpoints.create_run("d", "end2end", "if_better", None, None, None, None, None, True, True, "f1"),
    endpoints.list_runs(None),
    endpoints.get_run("r"),
    endpoints.run_events("r", 0),
    endpoints.run_events("r", 0, 10),
    endpoints.run_checkpoints("r"),
    endpoints.cancel_run("r"),
    endpoints.rebuild_domain("d"),
    endpoints.delete_domain("d"),
    endpoints.gc(False, 3, ["d"]),
]


@pytest.fixture(scope="module")
def openapi(live_server) -> dict:
    response = httpx.get(f"{live_server.url}/schema/openapi.json", timeout=30)
    response.raise_for_status()
    return response.json()


def _component(openapi: dict, name: str) -> dict:
    return openapi["components"]["schemas"][name]


@pytest.mark.parametrize("call", CALLS, ids=[f"{c.method} {c.path}" for c in CALLS])
def test_every_call_is_a_documented_operation(openapi, call):
    matches = [
        template
        for template in openapi["paths"]
        if re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", template), call.path)
    ]
    assert matches, f"{call.path} is no path of the service"
    assert any(call.method.lower() in openapi["paths"][template] for template in matches)


@pytest.mark.parametrize(("model", "component"), RESPONSES.items(), ids=[m.__name__ for m in RESPONSES])
def test_response_models_match_the_service(openapi, model: type[BaseModel], component: str):
    schema = _component(openapi, component)
    served = set(schema["properties"])
    sdk = set(model.model_fields)
    unknown = sdk - served
    assert not unknown, f"{model.__name__} reads fields the service never sends: {sorted(unknown)}"
    dropped = set(schema.get("required", [])) - sdk
    assert not dropped, f"{model.__name__} drops fields the service always sends: {sorted(dropped)}"


@pytest.mark.parametrize(("model", "component"), REQUESTS.items(), ids=[m.__name__ for m in REQUESTS])
def test_request_models_send_only_accepted_fields(openapi, model: type[BaseModel], component: str):
    accepted = set(_component(openapi, component)["properties"])
    assert set(model.model_fields) <= accepted, sorted(set(model.model_fields) - accepted)

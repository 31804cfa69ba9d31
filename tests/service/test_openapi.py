"""Property-based fuzzing of the served OpenAPI with schemathesis: no 5xx, and every response is documented.

Admin operations get the admin token (so they are fuzzed past authentication), except creating a domain, which
would start an index build per example; it is fuzzed without credentials and covered by its own tests.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)
from service.settings import Settings
from storage import open_store
from tests.service.support import ADMIN, ADMIN_TOKEN, ingest_domain, publish_adapter, serve

# Every operation the service serves; the first test fails when one is added without being listed here.
OPERATIONS = [
    ("POST", "/ask"), ("GET", "/domains"), ("GET", "/domains/{name}"), ("POST", "/admin/domains"),
    ("GET", "/admin/jobs/{job_id}"), ("POST", "/admin/domains/{name}/promote"),
    ("POST", "/admin/domains/{name}/rebuild"), ("DELETE", "/admin/domains/{name}"),
    ("POST", "/admin/domains/{name}/rollback"), ("POST", "/admin/adapt"), ("GET", "/admin/runs"),
    ("GET", "/admin/runs/{run_id}"), ("GET", "/admin/runs/{run_id}/events"),
    ("POST", "/admin/runs/{run_id}/cancel"),
    ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics"),
]
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(scope="module")
def api(tmp_path_factory, tiny_backbone_settings, direct_backbone):
    root = tmp_path_factory.mktemp("openapi")
    settings = Settings(data_dir=root / "data", backbone=tiny_backbone_settings, demo={"enabled": False},
                        runs={"max_concurrent": 0}, store={"backend": "local", "root": root / "store"},
                        server={"port": 0, "admin_token": ADMIN_TOKEN, "request_timeout_s": 30})
    store = open_store(settings.store_config)
    ingest_domain(store, direct_backbone, "alpha", root / "corpus")
    publish_adapter(store, direct_backbone, "alpha", 3, root / "adapters")
    with serve(settings) as served:
        yield served


@pytest.fixture(scope="module")
def api_schema(api):
    return schemathesis.openapi.from_url(f"{api.url}/schema/openapi.json")


def test_every_operation_is_fuzzed(api_schema):
    served = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert served == set(OPERATIONS)


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_fuzzed_requests_never_fail_the_server(api, api_schema, method, path):
    operation = api_schema[path][method]
    # Creating, rebuilding or deleting domains would start index builds or remove the fuzzed domain.
    authorised = path.startswith("/admin/") and (method, path) not in (
        ("POST", "/admin/domains"), ("POST", "/admin/domains/{name}/rebuild"),
        ("DELETE", "/admin/domains/{name}"))
    # Valid requests go to the domain that exists, so they run the whole pipeline; invalid ones go anywhere.
    positive = operation.as_strategy(GenerationMode.POSITIVE).map(_on_alpha)
    cases = st.one_of(positive, operation.as_strategy(GenerationMode.NEGATIVE))

    @given(case=cases)
    @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case):
        case.call_and_validate(base_url=api.url, headers=ADMIN if authorised else None, checks=CHECKS)

    check()
    if path == "/ask":  # the valid examples really were answered, not all refused
        answered = api.runtime.metrics.registry.get_sample_value("ragadapt_ask_requests_total",
                                                                 {"domain": "alpha", "code": "ok"})
        assert answered and answered > 0


def _on_alpha(case):
    if case.path_parameters and "name" in case.path_parameters:
        case.path_parameters["name"] = "alpha"
    if case.query and "domain" in case.query:
        case.query["domain"] = "alpha"
    return case

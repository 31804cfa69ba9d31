"""Bad requests get RFC 9457 problem details with the right status and code; every response carries an id."""

from __future__ import annotations

import json

import pytest

from adapters import AdapterRegistry
from backbone import AdapterSetConfig
from indexing import EncodeConfig, ingest, write_passages
from service.settings import Settings
from storage import DomainRegistry, open_store
from tests.service.support import ADMIN, ADMIN_TOKEN, corpus, ingest_domain, publish_adapter, serve

API_KEY = "test-api-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_backbone_settings, direct_backbone):
    root = tmp_path_factory.mktemp("errors")
    settings = Settings(
        data_dir=root / "data",
        backbone=tiny_backbone_settings,
        demo={"enabled": False},
        runs={"max_concurrent": 0, "max_batch_passages": 64},
        store={"backend": "local", "root": root / "store"},
        server={
            "port": 0,
            "admin_token": ADMIN_TOKEN,
            "api_keys": [API_KEY],
            "max_body_bytes": 4096,
            "max_run_body_bytes": 8192,
        },
    )
    store = open_store(settings.store_config)
    ingest_domain(store, direct_backbone, "alpha", root / "corpus")
    DomainRegistry(store).create_domain("empty")  # created, but no index built yet
    with serve(settings) as served:
        yield served, store, root


@pytest.fixture
def client(server):
    served, _, _ = server
    with served.client(headers={"X-API-Key": API_KEY}) as client:
        yield client


def _problem(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status and body["code"] == code
    assert body["type"].endswith("/" + code)
    assert body["request_id"] == response.headers["x-request-id"]
    return body


@pytest.mark.parametrize(
    "body",
    [
        {"question": ""},
        {"question": "   "},
        {"question": "what", "top_k": 0},
        {"question": "what", "top_k": 21},
        {"question": "what", "max_new_tokens": 257},
        {"question": "what", "retrieval": "telepathy"},
        {"top_k": 3},
    ],
)
def test_invalid_ask_bodies_are_422_invalid_request(client, body):
    _problem(client.post("/ask?domain=alpha", json=body), 422, "invalid_request")


def test_a_missing_body_is_422_saying_so(client):
    response = client.post("/ask?domain=alpha", headers={"content-type": "application/json"})
    assert "a JSON body is required" in _problem(response, 422, "invalid_request")["detail"]


def test_malformed_json_is_422_invalid_request(client):
    response = client.post(
        "/ask?domain=alpha", content=b'{"question": ', headers={"content-type": "application/json"}
    )
    _problem(response, 422, "invalid_request")


@pytest.mark.parametrize(
    "path",
    [
        "/ask?domain=alpha",
        "/admin/adapt",
        "/admin/domains",
        "/admin/domains/alpha/promote",
        "/admin/domains/alpha/rollback",
    ],
)
def test_deeply_nested_json_is_422_not_a_server_error(client, path):
    body = b'{"question": ' + b"[" * 1100 + b"]" * 1100 + b"}"
    response = client.post(path, content=body, headers={**ADMIN, "content-type": "application/json"})
    _problem(response, 422, "invalid_request")
    deeper = client.post(
        path, content=b"[" * 100_000 + b"]" * 100_000, headers={**ADMIN, "content-type": "application/json"}
    )
    # Past the body limit it is refused unread (uploads have a larger limit: read, then refused).
    assert deeper.status_code in (413, 422)
    code = "request_too_large" if deeper.status_code == 413 else "invalid_request"
    _problem(deeper, deeper.status_code, code)


@pytest.mark.parametrize(
    ("hyperparameters", "code", "why"),
    [
        ({"seed": 10**30}, "invalid_request", "seed"),
        ({"seed": -1}, "invalid_request", "seed"),
        ({"warmup_steps": 10**9}, "invalid_request", "warmup_steps"),
        ({"weight_decay": 1e6}, "invalid_request", "weight_decay"),
        ({"lora": {"generator": {"alpha": 10**7}}}, "invalid_request", "alpha"),
        ({"lora": {"generator": {"targets": ["no_such_proj"]}}}, "invalid_run", "no_such_proj"),
        ({"lora": {"question": {"targets": ["LayerNorm"]}}}, "invalid_run", "cannot wrap"),
        ({"batch_size": 16, "top_k": 5}, "invalid_run", "(64)"),
    ],
)
def test_runs_that_could_only_fail_later_are_refused_before_queueing(client, hyperparameters, code, why):
    body = {"domain": "alpha", "promote": "never", "hyperparameters": {"steps": 1, **hyperparameters}}
    refused = _problem(client.post("/admin/adapt", headers=ADMIN, json=body), 422, code)
    assert why in refused["detail"]
    assert client.get("/admin/runs", headers=ADMIN).json()["runs"] == []


def test_inline_run_bodies_have_a_small_limit_of_their_own(client):
    examples = [{"question": f"question {i} " + "x" * 80, "answers": ["a"]} for i in range(100)]
    body = {"domain": "alpha", "train": {"examples": examples}}
    refused = _problem(client.post("/admin/adapt", headers=ADMIN, json=body), 413, "request_too_large")
    assert "train.uri" in refused["detail"]


def test_unknown_and_not_yet_indexed_domains(client):
    _problem(client.post("/ask?domain=nosuch", json={"question": "what"}), 404, "domain_not_found")
    _problem(client.post("/ask?domain=Not%20A%20Name", json={"question": "what"}), 404, "domain_not_found")
    not_ready = _problem(client.post("/ask?domain=empty", json={"question": "what"}), 503, "index_not_ready")
    assert "empty" in not_ready["detail"]
    assert int(client.post("/ask?domain=empty", json={"question": "what"}).headers["retry-after"]) > 0
    _problem(client.post("/ask", json={"question": "what"}), 422, "invalid_request")


def test_oversized_body_is_413(client):
    body = json.dumps({"question": "x" * 8000}).encode()
    _problem(
        client.post("/ask?domain=alpha", content=body, headers={"content-type": "application/json"}),
        413,
        "request_too_large",
    )


def test_api_key_is_required_for_ask_when_configured(server):
    served, _, _ = server
    with served.client() as anonymous:
        _problem(anonymous.post("/ask?domain=alpha", json={"question": "what"}), 401, "unauthorized")
        wrong = anonymous.post("/ask?domain=alpha", json={"question": "what"}, headers={"X-API-Key": "nope"})
        _problem(wrong, 401, "unauthorized")
        right = anonymous.post(
            "/ask?domain=alpha",
            json={"question": "what is the capital of france"},
            headers={"X-API-Key": API_KEY},
        )
        assert right.status_code == 200, right.text


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": ADMIN_TOKEN},
        {"Authorization": f"Basic {ADMIN_TOKEN}"},
    ],
)
def test_admin_endpoints_need_the_admin_token(client, headers):
    response = client.post("/admin/domains/alpha/rollback", json={}, headers=headers)
    _problem(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"
    _problem(client.get("/admin/jobs/whatever", headers=headers), 401, "unauthorized")


def test_routes_and_methods(client):
    _problem(client.get("/nowhere"), 404, "not_found")
    _problem(client.get("/ask"), 405, "method_not_allowed")


def test_request_ids_are_echoed_or_made(client):
    given = client.get("/healthz", headers={"X-Request-ID": "trace-123"})
    assert given.headers["x-request-id"] == "trace-123"
    made = client.get("/healthz", headers={"X-Request-ID": "not {valid} " + "x" * 200})
    assert len(made.headers["x-request-id"]) == 32  # replaced by a fresh id
    assert client.get("/nowhere", headers={"X-Request-ID": "trace-404"}).json()["request_id"] == "trace-404"


def test_promotion_and_rollback_errors(server, client, direct_backbone):
    _, store, root = server
    _problem(
        client.post(
            "/admin/domains/alpha/promote", json={"version": "20260101T000000Z-abcdef"}, headers=ADMIN
        ),
        404,
        "version_not_found",
    )
    _problem(client.post("/admin/domains/alpha/rollback", json={}, headers=ADMIN), 409, "nothing_to_rollback")
    _problem(client.post("/admin/domains/nosuch/rollback", json={}, headers=ADMIN), 404, "domain_not_found")
    _problem(
        client.post(
            "/admin/domains/nosuch/promote", json={"version": "20260101T000000Z-abcdef"}, headers=ADMIN
        ),
        404,
        "domain_not_found",
    )

    good = publish_adapter(store, direct_backbone, "alpha", 5, root / "adapters")
    stale = client.post(
        "/admin/domains/alpha/promote", json={"version": good, "expected_etag": "stale"}, headers=ADMIN
    )
    _problem(stale, 409, "version_conflict")

    foreign_dir = root / "foreign"
    direct_backbone.add_adapter_set("foreign")
    direct_backbone.save_adapter_set("foreign", foreign_dir)
    direct_backbone.remove_adapter_set("foreign")
    foreign = (
        AdapterRegistry(store)
        .publish("alpha", foreign_dir, backbone_fingerprint="0000000000000000", lora=AdapterSetConfig())
        .version
    )
    _problem(
        client.post("/admin/domains/alpha/promote", json={"version": foreign}, headers=ADMIN),
        409,
        "adapter_incompatible",
    )
    info = client.get("/domains/alpha").json()
    assert info["live"]["adapter_version"] is None  # neither failed promotion moved the pointer


def test_bad_domain_uploads(client):
    lines = b'{"id": "a", "text": "fine"}\n{"id": "b", "text": \n'
    response = client.post(
        "/admin/domains",
        headers=ADMIN,
        data={"name": "broken"},
        files={"passages": ("p.jsonl", lines, "application/x-ndjson")},
    )
    assert _problem(response, 422, "invalid_passages")["line"] == 2
    exists = client.post(
        "/admin/domains", headers=ADMIN, json={"name": "alpha", "passages": [{"id": "x", "text": "y"}]}
    )
    _problem(exists, 409, "domain_exists")
    neither = client.post("/admin/domains", headers=ADMIN, json={"name": "gamma"})
    _problem(neither, 422, "invalid_request")
    elsewhere = client.post(
        "/admin/domains", headers=ADMIN, json={"name": "gamma", "passages_uri": "s3://x/p"}
    )
    _problem(elsewhere, 422, "invalid_request")
    missing = client.post(
        "/admin/domains", headers=ADMIN, json={"name": "gamma", "passages_uri": "in/no.jsonl"}
    )
    _problem(missing, 404, "object_not_found")
    assert client.get("/domains/gamma").status_code == 404
    files = {
        "passages": ("p.jsonl", b'{"id": "a", "text": "fine"}\n'),
        "qa": ("qa.jsonl", b'{"question": "q", "answers": ["a"]}\n{"question": ""}\n'),
    }
    bad_qa = client.post("/admin/domains", headers=ADMIN, data={"name": "broken"}, files=files)
    assert _problem(bad_qa, 422, "invalid_qa")["line"] == 2
    assert client.get("/domains/broken").status_code == 404  # nothing was created


def test_a_duplicate_passage_id_is_422_with_its_line(client):
    lines = b'{"id": "a", "text": "one"}\n{"id": "b", "text": "two"}\n{"id": "a", "text": "three"}\n'
    response = client.post(
        "/admin/domains",
        headers=ADMIN,
        data={"name": "dupes"},
        files={"passages": ("p.jsonl", lines, "application/x-ndjson")},
    )
    body = _problem(response, 422, "invalid_passages")
    assert body["line"] == 3 and "'a'" in body["detail"] and "line 1" in body["detail"]
    inline = client.post(
        "/admin/domains",
        headers=ADMIN,
        json={"name": "dupes", "passages": [{"id": "x", "text": "one"}, {"id": "x", "text": "two"}]},
    )
    assert _problem(inline, 422, "invalid_passages")["line"] == 2
    assert client.get("/domains/dupes").status_code == 404


def test_problems_and_readiness_name_no_server_paths(server, client):
    """Store keys and upload names only: never where the server keeps its data or a job's input."""
    _, _, root = server
    uploads = [
        b"\n\n",
        b'{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n',
        b'{"id": "a", "text": "x"}\n[1]\n',
    ]
    bodies = [
        client.get("/readyz", headers=ADMIN).text,
        *(
            client.post("/admin/domains", headers=ADMIN, json={"name": "gamma", "passages_uri": uri}).text
            for uri in ("in/no.jsonl", "s3://x/p")
        ),
        *(
            client.post(
                "/admin/domains",
                headers=ADMIN,
                data={"name": "gamma"},
                files={"passages": ("p.jsonl", upload)},
            ).text
            for upload in uploads
        ),
    ]
    run_elsewhere = {"domain": "alpha", "promote": "never", "train": {"uri": "s3://other/train.jsonl"}}
    bodies.append(client.post("/admin/adapt", headers=ADMIN, json=run_elsewhere).text)
    for body in bodies:
        assert str(root) not in body and "/tmp/" not in body, body


@pytest.mark.parametrize("name", ["evil\n", "evil\n\n", "ok\nevil"])
def test_a_name_with_a_newline_is_refused(client, name):
    """Names, run ids and version ids are matched whole: `$` alone also matches before a final newline."""
    created = client.post(
        "/admin/domains", headers=ADMIN, json={"name": name, "passages": [{"id": "x", "text": "y"}]}
    )
    assert created.status_code == 422, created.text
    assert name not in [d["name"] for d in client.get("/domains").json()["domains"]]
    multipart = client.post(
        "/admin/domains",
        headers=ADMIN,
        data={"name": name},
        files={"passages": ("p.jsonl", b'{"id": "a", "text": "fine"}\n')},
    )
    assert multipart.status_code == 422, multipart.text
    _problem(client.get("/admin/runs/20260101T000000Z-abcdef%0A", headers=ADMIN), 404, "run_not_found")


def test_an_unexpected_failure_is_a_500_that_reveals_nothing(
    local_store_settings, make_settings, direct_backbone, tmp_path
):
    """A corrupt index file in the server's local cache makes FAISS raise a plain RuntimeError."""
    settings = make_settings(local_store_settings)
    store = open_store(settings.store_config)
    corpus_file = tmp_path / "alpha.jsonl"
    write_passages(corpus(), corpus_file)
    result = ingest(
        "alpha",
        corpus_file,
        store,
        direct_backbone.config,
        backbone=direct_backbone,
        cache_dir=settings.cache_dir / "indexes",
        encode=EncodeConfig(progress=False),
    )
    version = result.index_version
    (settings.cache_dir / "indexes" / "alpha" / "indexes" / version / "index.faiss").write_bytes(b"garbage")
    with serve(settings) as served, served.client() as client:
        response = client.post("/ask?domain=alpha", json={"question": "what"})
        body = _problem(response, 500, "internal_error")
        assert body["request_id"] in body["detail"]
        assert "faiss" not in response.text.lower() and "Traceback" not in response.text
        assert client.get("/healthz").status_code == 200

"""Admin endpoints (bearer admin token): create domains, follow jobs, promote and roll back adapters."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from anyio import to_thread
from litestar import Request, Response, delete, get, post
from litestar.datastructures import UploadFile
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody
from pydantic import BaseModel, ValidationError

from adapters.errors import InvalidQaSet
from adapters.qa import QaExample, QaSets, parse_qa_jsonl
from indexing import EmptyCorpus, MalformedPassages, load_corpus
from storage import InvalidKey
from storage.store import check_key

from ..auth import admin_guard
from ..errors import DomainInUse, InvalidPassages, InvalidRequest
from ..gc import GcReport, collect, sweep_scratch
from ..problems import ProblemOperation, problem_responses
from ..runtime import Runtime
from ..schemas import (
    DOMAIN_PATTERN,
    CreateDomainRequest,
    CreateDomainResponse,
    DomainInfo,
    DomainName,
    GcRequest,
    JobInfo,
    PromoteRequest,
    RebuildRequest,
    Retrieval,
    RollbackRequest,
)
from .domains import describe

PASSAGES_FILE = "passages.jsonl"
QA_FILE = "qa.jsonl"


# --- creating a domain --------------------------------------------------------------------------------------


def _inline_refs(schema: dict) -> dict:
    """A pydantic JSON schema with its `$defs` inlined, so it stands alone inside the OpenAPI document."""
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    return resolve(schema)


_MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["name", "passages"],
    "properties": {
        "name": {"type": "string", "pattern": DOMAIN_PATTERN},
        "description": {"type": "string"},
        "retrieval": {"type": "string", "enum": ["dense", "bm25", "hybrid"]},
        "passages": {"type": "string", "format": "binary", "description": "JSONL: id, title, text per line"},
        "qa": {"type": "string", "format": "binary", "description": "JSONL: question, answers, ... per line"},
    },
}


class _CreateDomainOperation(ProblemOperation):
    """The handler reads JSON or multipart itself; this documents both bodies in the OpenAPI."""

    def to_schema(self) -> dict[str, Any]:
        schema = super().to_schema()
        schema["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {"schema": _inline_refs(CreateDomainRequest.model_json_schema())},
                "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
            },
        }
        return schema


class _DomainFields(BaseModel):
    """The non-file fields of a multipart domain upload, validated like the JSON body."""

    name: DomainName
    description: str = ""
    retrieval: Retrieval | None = None


def create_domain_handler(max_upload_bytes: int):
    """POST /admin/domains, with the upload size limit from the settings."""

    @post(
        "/admin/domains",
        status_code=202,
        guards=[admin_guard],
        request_max_body_size=max_upload_bytes,
        operation_class=_CreateDomainOperation,
        responses=problem_responses(401, 404, 409, 413, 422, 503),
        tags=["admin"],
        operation_id="createDomain",
        summary="Create a domain and build its index",
    )
    async def create_domain(
        request: Request, runtime: NamedDependency[Runtime]
    ) -> Response[CreateDomainResponse]:
        """Ingestion and the first index build run as a background job (`GET /admin/jobs/{id}`). The passages
        go to the store first, then the domain is created naming its job, so a server that stops midway leaves
        a domain that says why it has no index (and can be rebuilt or deleted), never one stuck building."""
        jobs = runtime.serving().jobs
        job_id, input_dir = jobs.new_input()
        try:
            fields = await _read_body(request, runtime, input_dir)
            passages = input_dir / PASSAGES_FILE
            await to_thread.run_sync(_check_passages, passages)
            qa = await to_thread.run_sync(_read_qa, input_dir / QA_FILE)
            retrieval = fields.retrieval or "dense"

            def create() -> JobInfo:
                key = jobs.store_input(job_id, passages)
                try:
                    record = runtime.registry.create_domain(
                        fields.name, fields.description, settings={"retrieval": retrieval}, build_job=job_id
                    )
                except BaseException:
                    jobs.discard_input(job_id)
                    raise
                if qa:
                    QaSets(runtime.store).publish(record.name, qa, source="POST /admin/domains")
                return jobs.create(
                    job_id, "ingest", record.name, input=key, index=runtime.settings.indexing.index(retrieval)
                )

            job = await to_thread.run_sync(create)
        except BaseException:
            shutil.rmtree(input_dir, ignore_errors=True)
            raise
        (input_dir / QA_FILE).unlink(missing_ok=True)  # the passages stay for the job, if it starts here
        return Response(CreateDomainResponse(job=job, domain=fields.name), status_code=202)

    return create_domain


async def _read_body(
    request: Request, runtime: Runtime, input_dir: Path
) -> CreateDomainRequest | _DomainFields:
    """Write the passages (and QA) of a JSON or multipart body into `input_dir`; return the other fields."""
    content_type = request.content_type[0]
    target = input_dir / PASSAGES_FILE
    if content_type == "multipart/form-data":
        form = await request.form()
        upload = form.get("passages")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("a multipart upload needs a 'passages' file (JSONL)")
        try:
            fields = _DomainFields.model_validate(
                {
                    key: form.get(key)
                    for key in ("name", "description", "retrieval")
                    if isinstance(form.get(key), str)
                }
            )
        except ValidationError as exc:
            raise InvalidRequest(_first_error(exc)) from None
        await to_thread.run_sync(_save_upload, upload, target)
        qa = form.get("qa")
        if isinstance(qa, UploadFile):
            await to_thread.run_sync(_save_upload, qa, input_dir / QA_FILE)
        return fields
    if content_type != "application/json":
        raise InvalidRequest("send application/json or multipart/form-data")
    try:
        body = CreateDomainRequest.model_validate_json(await request.body())
    except ValidationError as exc:
        raise InvalidRequest(_first_error(exc)) from None
    if body.passages is not None:
        await to_thread.run_sync(_write_jsonl, [p.model_dump() for p in body.passages], target)
    else:
        await to_thread.run_sync(_fetch_uri, runtime, body.passages_uri, target)
    if body.qa is not None:
        await to_thread.run_sync(
            _write_jsonl, [e.model_dump(exclude_none=True) for e in body.qa], input_dir / QA_FILE
        )
    return body


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {error['msg']}" if where else error["msg"]


def _save_upload(upload: UploadFile, target: Path) -> None:
    upload.file.seek(0)
    with target.open("wb") as out:
        shutil.copyfileobj(upload.file, out, 1 << 20)


def _write_jsonl(rows: list[dict], target: Path) -> None:
    with target.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


def _fetch_uri(runtime: Runtime, uri: str, target: Path) -> None:
    """A key of this server's store, or `s3://<its bucket>/<key>`; other buckets are not read."""
    config = runtime.settings.store_config
    key = uri
    if uri.startswith("s3://"):
        parts = urlsplit(uri)
        if config.backend != "s3" or parts.netloc != config.bucket:
            raise InvalidRequest(f"passages_uri {uri} is not in this server's store ({runtime.store.name()})")
        key = parts.path.lstrip("/")
    try:
        check_key(key)
    except InvalidKey as exc:
        raise InvalidRequest(f"passages_uri: {exc}") from None
    runtime.store.get_file(key, target)


def _read_qa(path: Path) -> list[QaExample]:
    """The uploaded QA set, checked line by line (InvalidQaSet: 422 invalid_qa with the line); [] if none."""
    if not path.exists():
        return []
    examples = parse_qa_jsonl(path.read_bytes())
    if not examples:
        raise InvalidQaSet("the QA file holds no example")
    return examples


def _check_passages(path: Path) -> None:
    """Read and chunk the corpus once before anything is created, so a bad line is a 422 with its number.
    The detail names the line, never where the server keeps the upload."""
    try:
        load_corpus(path)
    except MalformedPassages as exc:
        where = f"line {exc.line}: " if exc.line is not None else ""
        raise InvalidPassages(f"passages {where}{exc.reason}", line=exc.line) from None
    except EmptyCorpus:
        raise InvalidPassages("the passages hold no passage text") from None


# --- jobs, promotion, rollback ------------------------------------------------------------------------------


@get(
    "/admin/jobs/{job_id:str}",
    guards=[admin_guard],
    tags=["admin"],
    operation_id="getJob",
    summary="Follow a background job",
    operation_class=ProblemOperation,
    responses=problem_responses(401, 404, 503),
)
async def get_job(job_id: FromPath[str], runtime: NamedDependency[Runtime]) -> JobInfo:
    return await to_thread.run_sync(runtime.serving().jobs.get, job_id)


@post(
    "/admin/domains/{name:str}/rebuild",
    status_code=202,
    guards=[admin_guard],
    tags=["admin"],
    operation_id="rebuildDomain",
    summary="Build a domain's index again",
    operation_class=ProblemOperation,
    responses=problem_responses(401, 404, 409, 413, 422, 503),
)
async def rebuild(
    name: FromPath[str], runtime: NamedDependency[Runtime], data: JSONBody[RebuildRequest | None] = None
) -> Response[JobInfo]:
    """From the live passages with the live adapter's passage encoder; a domain whose first build failed is
    built from the passages it was created with. `409 build_in_progress` while a job builds it."""
    job = await to_thread.run_sync(runtime.serving().jobs.rebuild, name)
    return Response(job, status_code=202)


@delete(
    "/admin/domains/{name:str}",
    status_code=204,
    guards=[admin_guard],
    tags=["admin"],
    operation_id="deleteDomain",
    summary="Delete a domain and all its versions",
    operation_class=ProblemOperation,
    responses=problem_responses(401, 404, 409, 422, 503),
)
async def delete_domain(name: FromPath[str], runtime: NamedDependency[Runtime]) -> None:
    """Refused (`409 domain_in_use`) while an adaptation run of the domain is queued or running, or another
    server builds its index; a build running here is cancelled. Its live pointer goes first (nothing serves
    it from then on), then its versions, then its record: deleting again finishes an interrupted deletion."""
    loaded = runtime.serving()

    def remove() -> None:
        runtime.registry.get_domain(name, deleting=True)  # 404 for no domain; a deletion under way goes on
        using = [run for run in runtime.runs.list(name) if not run.state.finished]
        if using:
            raise DomainInUse(
                f"run {using[0].id} of domain {name!r} is {using[0].state.value}; cancel it "
                "first (POST /admin/runs/{id}/cancel)"
            )
        elsewhere = loaded.jobs.cancel(name)
        if elsewhere:
            raise DomainInUse(f"job {elsewhere[0].id} is building domain {name!r} on another server")
        runtime.registry.delete_domain(name)
        loaded.catalog.forget(name)

    await to_thread.run_sync(remove)


@post(
    "/admin/domains/{name:str}/promote",
    status_code=200,
    guards=[admin_guard],
    tags=["admin"],
    operation_id="promote",
    summary="Make an adapter version live",
    operation_class=ProblemOperation,
    responses=problem_responses(401, 404, 409, 413, 422, 503),
)
async def promote(
    name: FromPath[str], data: JSONBody[PromoteRequest], runtime: NamedDependency[Runtime]
) -> DomainInfo:
    """Checks the version against the loaded backbone and loads it before the live pointer moves; requests
    admitted before the move finish on the version they started with."""
    loaded = runtime.serving()
    await to_thread.run_sync(loaded.catalog.promote, name, data.version, data.expected_etag)
    return await to_thread.run_sync(describe, runtime, name)


@post(
    "/admin/domains/{name:str}/rollback",
    status_code=200,
    guards=[admin_guard],
    tags=["admin"],
    operation_id="rollback",
    summary="Return to the previous live versions",
    operation_class=ProblemOperation,
    responses=problem_responses(401, 404, 409, 413, 422, 503),
)
async def rollback(
    name: FromPath[str], runtime: NamedDependency[Runtime], data: JSONBody[RollbackRequest | None] = None
) -> DomainInfo:
    loaded = runtime.serving()
    await to_thread.run_sync(loaded.catalog.rollback, name, data.expected_etag if data is not None else None)
    return await to_thread.run_sync(describe, runtime, name)


@post(
    "/admin/gc",
    status_code=200,
    guards=[admin_guard],
    tags=["admin"],
    operation_id="collectGarbage",
    summary="Delete old versions and what faults left behind (a dry run by default)",
    operation_class=ProblemOperation,
    responses=problem_responses(401, 404, 413, 422, 503),
)
async def gc(runtime: NamedDependency[Runtime], data: JSONBody[GcRequest | None] = None) -> GcReport:
    """Keeps per domain the newest `keep_last` versions of each kind, the live and pinned ones, what they need
    and what queued runs start from; see `service.gc`. With `domains`, only those domains' versions."""
    request = data or GcRequest()
    loaded = runtime.serving()

    def run() -> GcReport:
        report = collect(
            runtime.store, keep_last=request.keep_last, dry_run=request.dry_run, domains=request.domains
        )
        if request.domains is None:
            job_dirs, jobs_use = loaded.jobs.scratch()
            worker_dirs, workers_use = runtime.runs.scratch()
            report.scratch = sweep_scratch(
                runtime.settings.data_dir, [*job_dirs, *worker_dirs], jobs_use | workers_use, request.dry_run
            )
        return report

    return await to_thread.run_sync(run)

"""Every endpoint of docs/http-api.md as a ``Call``: method, path, body and how to read the answer.

Both clients execute the same calls, so paths, bodies and parsing live here once.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Generic, TypeVar, Union
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from ragadapt_client.models import (
    Answer,
    Checkpoint,
    DomainCreated,
    DomainInfo,
    GcReport,
    Health,
    Hyperparameters,
    JobInfo,
    Readiness,
    Retrieval,
    RunEvents,
    RunInfo,
    RunResources,
)

T = TypeVar("T")
# A JSONL file on disk, or the records themselves (dicts or pydantic models).
Records = Union[str, "os.PathLike[str]", Iterable[Mapping[str, Any] | BaseModel]]


class Upload:
    """A JSONL file for a multipart field: streamed from disk, or serialised once from records in memory."""

    def __init__(self, source: Records, filename: str) -> None:
        self.filename = filename
        self._path: Path | None = None
        self._data: bytes | None = None
        if isinstance(source, (str, os.PathLike)):
            self._path = Path(source)
            if not self._path.is_file():
                raise FileNotFoundError(f"no such JSONL file: {self._path}")
            self.filename = self._path.name
        else:
            lines = [json.dumps(_record(item), ensure_ascii=False) for item in source]
            self._data = ("\n".join(lines) + "\n").encode() if lines else b""

    def open(self) -> BinaryIO:
        return self._path.open("rb") if self._path is not None else io.BytesIO(self._data or b"")


def _record(item: Mapping[str, Any] | BaseModel) -> dict[str, Any]:
    if isinstance(item, BaseModel):
        return item.model_dump(mode="json", exclude_none=True)
    if isinstance(item, Mapping):
        return dict(item)
    raise TypeError(f"records must be mappings or pydantic models, got {type(item).__name__}")


@dataclass(frozen=True)
class Call(Generic[T]):
    """One API call. ``admin`` calls carry the admin token, the others the API key."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: Mapping[str, str] | None = None
    json: Any = None
    form: Mapping[str, str] | None = None
    uploads: Mapping[str, Upload] | None = None
    admin: bool = False
    # A probe reports the state of the moment: retrying its 503 would only delay the answer.
    retry_statuses: bool = True

    @property
    def idempotent(self) -> bool:
        """Safe to repeat once it reached the server: everything except the admin POSTs, which start jobs
        and runs or move the live pointer, and DELETEs, whose repeat would answer 404 for what went through.
        ``POST /ask`` only reads."""
        return not (self.method in ("POST", "DELETE") and self.path.startswith("/admin/"))

    def build(
        self, http: httpx.Client | httpx.AsyncClient, headers: dict[str, str], files: ExitStack
    ) -> httpx.Request:
        """The request for one attempt. Upload files are opened into ``files``: each attempt rereads them."""
        multipart = None
        if self.uploads:
            multipart = {
                field: (upload.filename, files.enter_context(upload.open()), "application/x-ndjson")
                for field, upload in self.uploads.items()
            }
        return http.build_request(
            self.method,
            self.path,
            params=self.params,
            json=self.json,
            data=self.form,
            files=multipart,
            headers=headers,
        )


def _model(cls: type[BaseModel]) -> Callable[[httpx.Response], Any]:
    return lambda response: cls.model_validate(response.json())


def _listed(cls: type[BaseModel], key: str) -> Callable[[httpx.Response], list[Any]]:
    return lambda response: [cls.model_validate(item) for item in response.json()[key]]


def _domain(response: httpx.Response) -> DomainInfo:
    info = DomainInfo.model_validate(response.json())
    etag = response.headers.get("ETag")
    if info.etag is None and etag:
        info = info.model_copy(update={"etag": etag})
    return info


def _segment(value: str) -> str:
    if not value:
        raise ValueError("names and ids must not be empty")
    return quote(value, safe="")


def _without_none(values: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


def health() -> Call[Health]:
    return Call("GET", "/healthz", _model(Health))


def ready() -> Call[Readiness]:
    return Call("GET", "/readyz", _model(Readiness), retry_statuses=False)


def ask(
    domain: str,
    question: str,
    top_k: int | None,
    max_new_tokens: int | None,
    retrieval: Retrieval | None,
    return_passages: bool | None,
) -> Call[Answer]:
    body = _without_none(
        dict(
            question=question,
            top_k=top_k,
            max_new_tokens=max_new_tokens,
            retrieval=retrieval,
            return_passages=return_passages,
        )
    )
    return Call("POST", "/ask", _model(Answer), params={"domain": domain}, json=body)


def list_domains() -> Call[list[DomainInfo]]:
    return Call("GET", "/domains", _listed(DomainInfo, "domains"))


def get_domain(name: str) -> Call[DomainInfo]:
    return Call("GET", f"/domains/{_segment(name)}", _domain)


def create_domain(
    name: str,
    passages: Records | None,
    passages_uri: str | None,
    qa: Records | None,
    description: str | None,
    retrieval: Retrieval | None,
) -> Call[DomainCreated]:
    """Passages from a file or records go up as multipart JSONL; a ``passages_uri`` (a store key or
    ``s3://bucket/key``) goes as JSON and the server reads it from the store."""
    if (passages is None) == (passages_uri is None):
        raise ValueError("give exactly one of passages (a JSONL path or records) and passages_uri")
    if passages_uri is not None:
        body = _without_none(
            dict(name=name, description=description, passages_uri=passages_uri, retrieval=retrieval)
        )
        if qa is not None:
            body["qa"] = [_record(item) for item in _read_records(qa)]
        return Call("POST", "/admin/domains", _model(DomainCreated), json=body, admin=True)
    uploads = {"passages": Upload(passages, "passages.jsonl")}
    if qa is not None:
        uploads["qa"] = Upload(qa, "qa.jsonl")
    form = _without_none(dict(name=name, description=description, retrieval=retrieval))
    return Call("POST", "/admin/domains", _model(DomainCreated), form=form, uploads=uploads, admin=True)


def _read_records(source: Records) -> Iterable[Mapping[str, Any] | BaseModel]:
    if not isinstance(source, (str, os.PathLike)):
        return source
    with Path(source).open() as fh:
        return [json.loads(line) for line in fh if line.strip()]


def get_job(job_id: str) -> Call[JobInfo]:
    return Call("GET", f"/admin/jobs/{_segment(job_id)}", _model(JobInfo), admin=True)


def rebuild_domain(name: str) -> Call[JobInfo]:
    return Call("POST", f"/admin/domains/{_segment(name)}/rebuild", _model(JobInfo), json={}, admin=True)


def delete_domain(name: str) -> Call[None]:
    return Call("DELETE", f"/admin/domains/{_segment(name)}", lambda response: None, admin=True)


def promote(name: str, version: str, expected_etag: str | None) -> Call[DomainInfo]:
    body = _without_none(dict(version=version, expected_etag=expected_etag))
    return Call("POST", f"/admin/domains/{_segment(name)}/promote", _domain, json=body, admin=True)


def rollback(name: str, expected_etag: str | None) -> Call[DomainInfo]:
    body = _without_none(dict(expected_etag=expected_etag))
    return Call("POST", f"/admin/domains/{_segment(name)}/rollback", _domain, json=body, admin=True)


def gc(apply: bool, keep_last: int | None, domains: Iterable[str] | None) -> Call[GcReport]:
    body = _without_none(
        dict(dry_run=not apply, keep_last=keep_last, domains=list(domains) if domains is not None else None)
    )
    return Call("POST", "/admin/gc", _model(GcReport), json=body, admin=True)


def create_run(
    domain: str,
    mode: str,
    promote: str,
    split: str | None,
    uri: str | None,
    examples: Iterable[Mapping[str, Any] | BaseModel] | None,
    hyperparameters: Hyperparameters | Mapping[str, Any] | None,
    reconstruction: Mapping[str, Any] | None,
    synthetic: Mapping[str, Any] | bool,
    use_qa: bool,
    promote_metric: str | None,
    metadata: Mapping[str, str] | None = None,
    resources: RunResources | Mapping[str, Any] | None = None,
) -> Call[RunInfo]:
    """Training data is one of: a split of the domain's QA (default ``train``), a store URI, or examples; plus
    synthetic data from the domain's passages (``True``: the server's default, a mapping: as given)."""
    given = [value is not None for value in (uri, examples)]
    if sum(given) > 1 or (any(given) and split is not None):
        raise ValueError("give at most one of split, uri and examples")
    if not use_qa and (any(given) or split is not None or not synthetic):
        raise ValueError("use_qa=False trains on synthetic data alone: give no split, uri or examples")
    if not use_qa:
        train: dict[str, Any] = {}
    elif uri is not None:
        train = {"uri": uri}
    elif examples is not None:
        train = {"examples": [_record(item) for item in examples]}
    else:
        train = {"split": split or "train"}
    if synthetic:
        train["synthetic"] = {} if synthetic is True else dict(synthetic)
    if not isinstance(hyperparameters, BaseModel):
        hyperparameters = Hyperparameters.model_validate(hyperparameters or {})
    hyper = hyperparameters.model_dump(mode="json", exclude_none=True)
    body = dict(domain=domain, mode=mode, promote=promote, train=train, hyperparameters=hyper)
    if reconstruction is not None:
        body["reconstruction"] = dict(reconstruction)
    if promote_metric is not None:
        body["promote_metric"] = promote_metric
    if metadata is not None:
        body["metadata"] = dict(metadata)
    if resources is not None:
        if not isinstance(resources, BaseModel):
            resources = RunResources.model_validate(resources)
        body["resources"] = resources.model_dump(mode="json", exclude_none=True)
    return Call("POST", "/admin/adapt", _model(RunInfo), json=body, admin=True)


def list_runs(domain: str | None) -> Call[list[RunInfo]]:
    params = {"domain": domain} if domain is not None else None
    return Call("GET", "/admin/runs", _listed(RunInfo, "runs"), params=params, admin=True)


def get_run(run_id: str) -> Call[RunInfo]:
    return Call("GET", f"/admin/runs/{_segment(run_id)}", _model(RunInfo), admin=True)


def run_events(run_id: str, after: int, limit: int | None = None) -> Call[RunEvents]:
    params = {"after": str(after), **({"limit": str(limit)} if limit is not None else {})}
    return Call("GET", f"/admin/runs/{_segment(run_id)}/events", _model(RunEvents), params=params, admin=True)


def run_checkpoints(run_id: str) -> Call[list[Checkpoint]]:
    return Call(
        "GET", f"/admin/runs/{_segment(run_id)}/checkpoints", _listed(Checkpoint, "checkpoints"), admin=True
    )


def cancel_run(run_id: str) -> Call[RunInfo]:
    return Call("POST", f"/admin/runs/{_segment(run_id)}/cancel", _model(RunInfo), json={}, admin=True)

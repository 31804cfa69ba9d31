"""HTTP request and response bodies as docs/http-api.md describes them (the OpenAPI comes from these)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from adapters.spec import QaExampleIn
from backbone.config import integral_floats
from storage.artifacts import VERSION_ID
from storage.registry import DOMAIN_PATTERN

Retrieval = Literal["dense", "bm25", "hybrid"]
DomainName = Annotated[str, StringConstraints(pattern=DOMAIN_PATTERN)]
NonBlank = Annotated[str, StringConstraints(pattern=r"\S")]  # holds more than whitespace


class _Request(BaseModel):
    """A request body: unknown fields and values of another JSON type are errors, as the published JSON
    Schema states (a number with a zero fraction still counts as an integer)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    _integral = model_validator(mode="before")(integral_floats)


# --- asking -------------------------------------------------------------------------------------------------


class AskRequest(_Request):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"question": "Which package ships the generator weights?", "top_k": 3, "max_new_tokens": 16}
            ]
        }
    )

    question: NonBlank = Field(max_length=4000)
    top_k: int = Field(5, ge=1, le=20)
    max_new_tokens: int = Field(32, ge=1, le=256)
    retrieval: Retrieval | None = None  # None: the domain's setting
    return_passages: bool = True


class PassageOut(BaseModel):
    id: str
    title: str
    text: str
    score: float
    supporting: bool  # among the passages the answer was generated from


class Timings(BaseModel):
    """Seconds per stage; embed and search are shared by the questions that joined together, generate runs
    from their prefill to this answer; first_token from admission to the answer's first token (queue, embed,
    search and prefill: the time to first token)."""

    queue: float
    embed: float
    search: float
    generate: float
    first_token: float


class AskResponse(BaseModel):
    answer: str
    domain: str
    adapter_version: str | None  # None while the domain is served by the base backbone
    index_version: str
    passages: list[PassageOut]
    timings: Timings


# --- domains ------------------------------------------------------------------------------------------------


class LiveInfo(BaseModel):
    adapter_version: str | None
    index_version: str | None
    passages_version: str | None
    updated_at: datetime | None


class AdapterVersionInfo(BaseModel):
    version: str
    created_at: datetime
    run_id: str | None
    parent: str | None
    index_version: str | None
    metrics: dict[str, Any]


class IndexVersionInfo(BaseModel):
    version: str
    created_at: datetime
    passages_version: str | None
    adapter_version: str | None
    passages: int | None
    factory: str | None


class DomainVersions(BaseModel):
    adapters: list[AdapterVersionInfo]
    indexes: list[IndexVersionInfo]


class DomainInfo(BaseModel):
    name: str
    description: str
    passages: int | None  # in the live index; None before the first index is live
    retrieval: Retrieval
    live: LiveInfo
    metrics: dict[str, Any]  # of the live adapter version
    last_run: dict[str, Any] | None
    versions: DomainVersions
    etag: str | None  # of the live pointer read: `expected_etag` promotes/rolls back only if it is unchanged


class DomainList(BaseModel):
    domains: list[DomainInfo]


# --- admin --------------------------------------------------------------------------------------------------


class PassageIn(_Request):
    id: NonBlank
    title: str = ""
    text: str


class CreateDomainRequest(_Request):
    """JSON form of POST /admin/domains; give the passages inline or as a store key / s3:// URI."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "oneOf": [
                {"required": ["passages_uri"], "properties": {"passages_uri": {"type": "string"}}},
                {"required": ["passages"], "properties": {"passages": {"type": "array"}}},
            ]
        },
    )

    name: DomainName
    description: str = ""
    passages_uri: str | None = None
    passages: list[PassageIn] | None = Field(None, min_length=1)
    qa: list[QaExampleIn] | None = None  # becomes the domain's QA set (what adaptation runs train on)
    retrieval: Retrieval | None = None

    @model_validator(mode="after")
    def _one_source(self) -> CreateDomainRequest:
        if (self.passages_uri is None) == (self.passages is None):
            raise ValueError("give exactly one of passages_uri and passages")
        return self


class JobInfo(BaseModel):
    id: str
    kind: Literal["ingest", "rebuild"]
    domain: str
    state: Literal["pending", "running", "succeeded", "failed", "cancelled"]
    progress: float
    error: str | None
    result: dict[str, Any] | None


class CreateDomainResponse(BaseModel):
    job: JobInfo
    domain: str


class PromoteRequest(_Request):
    version: str = Field(pattern=f"^{VERSION_ID.pattern}$")  # an unknown one is 404 version_not_found
    expected_etag: str | None = None


class RollbackRequest(_Request):
    expected_etag: str | None = None


class RebuildRequest(_Request):
    """POST /admin/domains/{d}/rebuild takes no options yet: an empty object or no body."""


class GcRequest(_Request):
    """POST /admin/gc: a dry run unless `dry_run` is false."""

    dry_run: bool = True
    keep_last: int = Field(5, ge=0, le=1000)  # newest versions of each kind kept per domain
    domains: list[DomainName] | None = Field(None, max_length=1000)  # only these domains' versions


# --- operations ---------------------------------------------------------------------------------------------


class Health(BaseModel):
    status: Literal["alive"]


class RunWorkers(BaseModel):
    """This process's adaptation-run workers: `supervisor` is "stopped" when it runs none."""

    supervisor: Literal["running", "stopped"]
    workers: int  # alive now
    expected: int


class Ready(BaseModel):
    status: Literal["ready"]
    backbone: str
    store: str
    runs: RunWorkers
    building: list[str]  # domains whose first index this server is building: they answer 503 until it is live


class Problem(BaseModel):
    """RFC 9457 problem details; clients dispatch on `code`."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    request_id: str
    line: int | None = None  # invalid_passages: the JSONL line at fault
    errors: list[dict[str, str]] | None = None  # invalid_request: one entry per invalid field

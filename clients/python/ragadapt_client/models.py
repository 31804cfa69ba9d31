"""Typed responses and request parts, mirroring docs/http-api.md.

Models accept fields they do not know (``extra="allow"``), so a newer server does not break an older client.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Retrieval = Literal["dense", "bm25", "hybrid"]
RunMode = Literal["end2end", "generator_only", "retriever_only"]
PromotePolicy = Literal["never", "if_better", "always"]
JobState = Literal["pending", "running", "succeeded", "failed", "cancelled"]
RunState = Literal["validating", "queued", "running", "succeeded", "failed", "cancelled"]

JOB_FINISHED = frozenset({"succeeded", "failed", "cancelled"})
RUN_FINISHED = frozenset({"succeeded", "failed", "cancelled"})


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class Passage(_Model):
    """A retrieved passage; ``supporting`` marks the passages the answer drew on."""

    id: str
    title: str = ""
    text: str
    score: float | None = None
    supporting: bool = False


class Timings(_Model):
    """Seconds spent per serving stage."""

    queue: float | None = None
    embed: float | None = None
    search: float | None = None
    generate: float | None = None
    first_token: float | None = None  # from admission to the answer's first token


class Answer(_Model):
    """``POST /ask``. ``adapter_version`` is ``None`` while the domain is served by the base backbone."""

    answer: str
    domain: str
    adapter_version: str | None = None
    index_version: str | None = None
    passages: list[Passage] = Field(default_factory=list)
    timings: Timings = Field(default_factory=Timings)


class LiveState(_Model):
    """Which versions serve a domain now."""

    adapter_version: str | None = None
    index_version: str | None = None
    passages_version: str | None = None
    updated_at: datetime | None = None


class LatestStep(_Model):
    """The metrics of a run's most recent training step."""

    loss: float | None = None
    lr: float | None = None
    examples_per_s: float | None = None
    marginal: float | None = None  # the terms of the loss the step had (joint phase)
    contrastive: float | None = None  # the retriever phase's loss; in the joint phase, rows with gold
    lm_supervision: float | None = None


class RunMetrics(_Model):
    """Evaluation reports of the base (before) and final (after) model: ``exact_match``, ``f1`` and ``recall``
    (per retrieval mode, per k) with their 95% intervals (``f1_ci`` ...); ``improvement``: final - base per
    figure (``f1``, ``dense_recall@5`` ...) as ``{"value", "ci", "questions"}``, paired bootstrap
    intervals."""

    base: dict[str, Any] | None = None
    final: dict[str, Any] | None = None
    improvement: dict[str, Any] | None = None


class RunResources(_Model):
    """What a run asks a Ray cluster for (servers with ``runs.executor: ray``; the local executor ignores
    it). Fields left ``None`` take the server's defaults."""

    cpus: float | None = None
    gpus: float | None = None
    memory_bytes: int | None = None


class RunInfo(_Model):
    """An adaptation run: ``validating -> queued -> running -> succeeded | failed | cancelled``.

    ``error_code`` is the stable code of a failure; ``parent`` the adapter version the run started from.
    """

    id: str
    domain: str
    mode: RunMode
    state: RunState
    step: int = 0
    total_steps: int | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = None
    error_code: str | None = None
    metrics: RunMetrics = Field(default_factory=RunMetrics)
    adapter_version: str | None = None
    index_version: str | None = None
    promoted: bool = False
    latest: LatestStep = Field(default_factory=LatestStep)
    parent: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)  # the labels given when it was created
    estimated_finish: datetime | None = None  # when training should end, at the pace of its recent steps
    resources: RunResources | None = None  # what it asked a Ray cluster for (None: a local executor's run)

    @field_validator("latest", "metrics", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value

    @property
    def finished(self) -> bool:
        return self.state in RUN_FINISHED


class AdapterVersion(_Model):
    """A published adapter set: which run trained it, from which parent, its evaluation metrics."""

    version: str
    created_at: datetime | None = None
    run_id: str | None = None
    parent: str | None = None
    index_version: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)


class IndexVersion(_Model):
    """A built index: over which passages, with which adapter's passage encoder, which FAISS factory."""

    version: str
    created_at: datetime | None = None
    passages_version: str | None = None
    adapter_version: str | None = None
    passages: int | None = None
    factory: str | None = None


class DomainVersions(_Model):
    """The adapter and index versions a domain holds (live or not)."""

    adapters: list[AdapterVersion] = Field(default_factory=list)
    indexes: list[IndexVersion] = Field(default_factory=list)


class DomainInfo(_Model):
    """``GET /domains/{name}``. ``etag`` identifies the live pointer read; pass it to ``promote`` to make the
    promotion conditional on nobody having changed the domain since."""

    name: str
    description: str = ""
    passages: int | None = None  # in the live index; None until the first index is live
    retrieval: Retrieval | None = None
    live: LiveState = Field(default_factory=LiveState)
    metrics: dict[str, Any] = Field(default_factory=dict)
    last_run: RunInfo | None = None
    versions: DomainVersions = Field(default_factory=DomainVersions)
    etag: str | None = None


class JobInfo(_Model):
    """A background job (ingest, rebuild): ``pending -> running -> succeeded | failed | cancelled``."""

    id: str
    kind: str
    domain: str
    state: JobState
    progress: float = 0.0
    error: str | None = None
    result: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        return self.state in JOB_FINISHED


class RunEvent(_Model):
    """One event of a run. ``kind`` is ``state|step|rebuild|eval|checkpoint``; the other fields depend on it
    and are reachable as attributes or through ``model_extra``."""

    seq: int
    time: datetime | None = None
    kind: str


class RunEvents(_Model):
    """A page of events; pass ``next`` as ``after`` to get the events that follow (``has_more``: some
    already do)."""

    events: list[RunEvent] = Field(default_factory=list)
    next: int
    has_more: bool = False


class Checkpoint(_Model):
    """A run's checkpoint: an adapter version of its domain that can be evaluated or promoted like any
    other; ``metrics`` are those of the step it was taken at (loss, lr)."""

    step: int
    created_at: datetime | None = None
    adapter_version: str
    metrics: dict[str, float] = Field(default_factory=dict)


class GcReport(_Model):
    """What a garbage collection deleted (in a dry run: would delete)."""

    dry_run: bool
    keep_last: int
    versions: list[str] = Field(default_factory=list)  # "<domain>/<kind>/<version>"
    runs: list[str] = Field(default_factory=list)  # runs whose leftovers went
    failed_runs: list[str] = Field(default_factory=list)  # runs stuck validating, marked failed
    job_inputs: list[str] = Field(default_factory=list)  # jobs whose stored passages went
    domains: list[str] = Field(default_factory=list)  # domains whose interrupted deletion was finished
    scratch: list[str] = Field(default_factory=list)  # the server's local scratch directories


class DomainCreated(_Model):
    """``POST /admin/domains``: the ingest job building the new domain's passages and first index."""

    job: JobInfo
    domain: str


class Health(_Model):
    """``GET /healthz``."""

    status: str


class RunWorkers(_Model):
    """The server's adaptation-run workers: ``supervisor`` is ``stopped`` when it trains none itself."""

    supervisor: str
    workers: int = 0  # alive now
    expected: int = 0


class Readiness(_Model):
    """``GET /readyz`` when ready; ``backbone`` is the loaded backbone's fingerprint."""

    status: str
    backbone: str | None = None
    store: str | None = None
    runs: RunWorkers | None = None
    building: list[str] = Field(default_factory=list)  # domains whose first index is still being built


class LoraSpec(_Model):
    """LoRA settings of one component (question encoder, passage encoder or generator); ``targets`` ``None``:
    the attention query/key/value projections."""

    r: int | None = None
    alpha: int | None = None
    dropout: float | None = None
    targets: list[str] | None = None


class LoraSpecs(_Model):
    question: LoraSpec | None = None
    passage: LoraSpec | None = None
    generator: LoraSpec | None = None


class Hyperparameters(_Model):
    """Run hyperparameters; fields left ``None`` take the server's defaults."""

    steps: int | None = None
    epochs: float | None = None  # instead of steps: passes over the training examples
    lr: float | None = None
    batch_size: int | None = None
    grad_accumulation: int | None = None
    top_k: int | None = None
    index_refresh_every: int | None = None  # steps between asynchronous index rebuilds (End2End)
    max_index_staleness: int | None = None  # steps training runs ahead of a pending rebuild before it waits
    reconstruction_ratio: float | None = None  # share of examples that are sentence reconstructions
    retriever_steps: int | None = (
        None  # the retriever phase (contrastive, encoders only) before the joint one
    )
    retriever_epochs: float | None = None  # instead of retriever_steps: passes over the retrieval pairs
    retriever_batch_size: int | None = None
    retriever_lr: float | None = None
    temperature: float | None = None  # of the contrastive loss
    hard_negatives: int | None = None  # per query from each of the dense and BM25 top 10 minus gold
    marginal_weight: float | None = None  # joint phase: the RAG End2End marginal loss
    contrastive_weight: float | None = None  # joint phase: the contrastive loss of rows with gold passages
    lm_supervision_weight: float | None = None  # joint phase: LM-supervised retrieval of rows without
    gold_passage_prob: float | None = None  # RAFT: how often a row's gold passage is among its k in training
    query_side_only: bool | None = None  # LoRA on the question encoder only: no re-indexing
    seed: int | None = None
    checkpoint_every: int | None = None  # steps between checkpoints, each an adapter version (checkpoints())
    lora: LoraSpecs | None = None

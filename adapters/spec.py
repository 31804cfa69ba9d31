"""Adaptation runs: what a run asks for (`RunRequest`), what it reports (`RunInfo`), and where it lives.

A run is a persisted state machine, so a restart loses nothing:

    validating -> queued -> running -> succeeded | failed | cancelled
                     ^         |
                     +---------+   interrupted (worker died, service stopping): resumes from its checkpoint

Store layout, all under `runs/` (S3 has no append, so events are pages rewritten by compare-and-swap):

    runs/<run_id>/run.json                    the record: RunInfo fields, the request, the worker's lease
    runs/<run_id>/events/<page:06d>.json      events; page p holds seq p*PAGE+1 .. (p+1)*PAGE (PAGE=100)
    runs/<run_id>/inputs/train.jsonl          training examples, validated and frozen at submit (QA lines)
    runs/<run_id>/inputs/eval.jsonl           evaluation examples (the domain's dev split unless given)
    runs/<run_id>/inputs/reconstruction.txt   reconstruction sentences, one a line (when given explicitly)
    runs/<run_id>/checkpoints/<version>/      adapter set, optimizer, RNG and trainer state (manifest last)
    runs/<run_id>/indexes/<version>/          a mid-run index a checkpoint trains against (manifest last)
    runs/queue/<run_id>                       exists while the run is queued or running: what workers scan

Checkpoints and mid-run indexes are deleted when a run ends; the record, its inputs and events stay.
"""

from __future__ import annotations

import json
import math
import os
import socket
import typing
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from adapters.errors import DomainNotFound, InvalidQaSet, InvalidRun, LeaseLost, RunNotFound
from adapters.qa import QaExample, QaSets, example_from_record, parse_qa_jsonl, to_jsonl
from storage import artifacts
from storage.errors import DomainNotFound as StoreDomainNotFound
from storage.errors import InvalidDomainName, InvalidKey, ObjectNotFound, PreconditionFailed
from storage.registry import DOMAIN_PATTERN, ArtifactKind, DomainRegistry
from storage.store import ObjectStore

Mode = Literal["end2end", "generator_only", "retriever_only"]
PromotePolicy = Literal["never", "if_better", "always"]

# Which adapters of the set each mode trains (the others stay as they start: the parent's, or zero LoRA).
MODE_COMPONENTS: dict[str, tuple[str, ...]] = {
    "end2end": ("question", "passage", "generator"),
    "generator_only": ("generator",),
    "retriever_only": ("question", "passage"),
}
DEFAULT_STEPS = 100
SEED_MAX = 2**32 - 1
DEFAULT_REFRESH_EVERY = 100
EVENTS_PER_PAGE = 100
QUEUE_PREFIX = "runs/queue/"
RUN_ID = artifacts.VERSION_ID  # run ids are version ids (new_version_id); matched whole


class RunState(StrEnum):
    VALIDATING = "validating"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED)


# --- the request --------------------------------------------------------------------------------------------


def integral_floats(cls: type[BaseModel], data: Any) -> Any:
    """A JSON number with a zero fraction is an integer (JSON Schema says so, and clients send 5.0): turn
    those of int fields into ints before strict validation, which takes only ints there."""
    if not isinstance(data, dict):
        return data
    fields = cls.model_fields
    return {
        name: int(value)
        if isinstance(value, float) and value.is_integer() and name in fields and _takes_int(fields[name])
        else value
        for name, value in data.items()
    }


def _takes_int(field: Any) -> bool:
    kinds = typing.get_args(field.annotation) or (field.annotation,)
    return int in kinds and float not in kinds


class _Strict(BaseModel):
    """A request part: unknown fields and values of another JSON type ("5" for 5, "true" for true) are
    errors, as the published JSON Schema states."""

    model_config = ConfigDict(extra="forbid", strict=True)
    _integral = model_validator(mode="before")(integral_floats)


class LoraSpec(_Strict):
    """LoRA on one component. `targets` None: the architecture's attention Q/K/V projections."""

    r: int = Field(8, ge=1, le=256)
    alpha: int = Field(16, ge=1, le=4096)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    targets: list[str] | None = None


class LoraSettings(_Strict):
    question: LoraSpec = LoraSpec()
    passage: LoraSpec = LoraSpec()
    generator: LoraSpec = LoraSpec()


NonBlank = Annotated[str, StringConstraints(pattern=r"\S")]  # what adapters.qa takes for a question or answer


class QaExampleIn(_Strict):
    question: NonBlank
    answers: list[NonBlank] = Field(min_length=1)
    passage_ids: list[Annotated[str, StringConstraints(min_length=1)]] = Field(default_factory=list)
    split: str | None = None
    id: str | None = None


class IctSettings(_Strict):
    """Inverse-cloze pairs: a sentence of a passage is a query for that passage (retriever training only)."""

    keep_sentence: float = Field(1.0, ge=0.0, le=1.0)  # how often the sentence stays in its passage
    min_words: int = Field(5, ge=1, le=1000)
    max_words: int = Field(64, ge=2, le=1000)
    max_pairs: int | None = Field(None, ge=1)  # a seeded sample of at most this many (None: every passage)

    @model_validator(mode="after")
    def _words(self) -> IctSettings:
        if self.min_words > self.max_words:
            raise ValueError("min_words must not exceed max_words")
        return self


class GeneratedSettings(_Strict):
    """Questions the generator writes about the domain's passages, kept when round-trip consistent."""

    max_passages: int = Field(500, ge=1, le=1_000_000)  # a seeded sample of passages to write questions for
    shots: int = Field(2, ge=1, le=8)  # domain examples shown to the generator
    round_trip_k: int = Field(20, ge=1, le=1000)
    max_new_tokens: int = Field(48, ge=8, le=256)


class SyntheticSource(_Strict):
    """Training data made from the domain's own passages (adapters.synthetic)."""

    ict: IctSettings | None = IctSettings()
    generated: GeneratedSettings | None = None
    # The share of QA rows drawn from generated questions when there are real ones too.
    ratio: float = Field(0.5, ge=0.0, le=1.0)


class QaSource(_Strict):
    """At most one of: a split of the domain's QA set, a store key of a QA JSONL file, or inline examples;
    plus, optionally, synthetic data made from the domain's passages. A training source may be synthetic
    only (a domain without QA pairs); an evaluation source may not."""

    split: str | None = None
    uri: str | None = None
    examples: list[QaExampleIn] | None = None
    synthetic: SyntheticSource | None = None

    @model_validator(mode="after")
    def _one_source(self) -> QaSource:
        given = [name for name in ("split", "uri", "examples") if getattr(self, name) is not None]
        if len(given) > 1 or (not given and self.synthetic is None):
            raise ValueError(f"give one of split, uri or examples, and/or synthetic (got {given or 'none'})")
        return self

    @property
    def real(self) -> bool:
        """Whether real QA examples are given (not only synthetic data)."""
        return any(getattr(self, name) is not None for name in ("split", "uri", "examples"))


class ReconstructionSource(_Strict):
    """Sentences the model learns to reconstruct from retrieved passages. Neither `uri` nor `sentences`:
    sentences cut from the domain's own passages. `uri`: a store key of a text file (one sentence a line)."""

    uri: str | None = None
    sentences: list[str] | None = None
    max_sentences: int = Field(5000, ge=1)
    min_words: int = Field(6, ge=1)
    max_words: int = Field(48, ge=2)

    @model_validator(mode="after")
    def _at_most_one(self) -> ReconstructionSource:
        if self.uri is not None and self.sentences is not None:
            raise ValueError("give uri or sentences, not both")
        if self.min_words > self.max_words:
            raise ValueError("min_words must not exceed max_words")
        return self


class Hyperparameters(_Strict):
    steps: int | None = Field(None, ge=1, le=1_000_000)  # optimizer steps; default DEFAULT_STEPS
    epochs: float | None = Field(None, gt=0, le=1000)  # instead of steps: passes over the QA examples
    lr: float = Field(1e-3, gt=0, le=1.0)
    warmup_steps: int = Field(0, ge=0, le=1_000_000)
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    batch_size: int = Field(4, ge=1, le=1024)
    grad_accumulation: int = Field(1, ge=1, le=1024)
    top_k: int = Field(5, ge=1, le=100)  # passages retrieved per example, in training and in evaluation
    loss: Literal["sequence", "token"] = "sequence"
    index_refresh_every: int | None = Field(
        None, ge=1
    )  # steps; default DEFAULT_REFRESH_EVERY when re-indexable
    # Bounded staleness: a refresh that has not landed this many steps after it started makes training wait
    # for it. None: never wait (RAG End2End's behaviour); on a slow host the index may then trail far behind.
    max_index_staleness: int | None = Field(None, ge=1)
    reconstruction_ratio: float = Field(0.0, ge=0.0, lt=1.0)  # share of examples that are reconstructions
    # The retriever phase (before the joint one): encoders only, the contrastive loss over retrieval pairs
    # (real questions with gold passages, generated questions, inverse-cloze pairs), then an index refresh.
    retriever_steps: int | None = Field(None, ge=0, le=1_000_000)  # None: retriever_epochs over the pairs
    retriever_epochs: float = Field(2.0, ge=0.0, le=100.0)
    retriever_batch_size: int = Field(32, ge=2, le=1024)
    retriever_lr: float = Field(1e-3, gt=0, le=1.0)
    temperature: float = Field(0.05, gt=0, le=10.0)  # of the contrastive loss (scores are cosines)
    # Per query, from each of the dense and BM25 top 10 of the current index minus its gold passages. Off by
    # default: on finance they tripled the cost of a step and moved recall@5 within the noise.
    hard_negatives: int = Field(0, ge=0, le=32)
    # The joint phase: the weighted sum of the marginal RAG loss, the contrastive loss (rows with gold
    # passages) and LM-supervised retrieval (rows without). Only marginal_weight: RAG End2End as published.
    marginal_weight: float = Field(1.0, ge=0.0, le=100.0)
    contrastive_weight: float = Field(1.0, ge=0.0, le=100.0)
    lm_supervision_weight: float = Field(0.0, ge=0.0, le=100.0)
    lm_supervision_temperature: float = Field(1.0, gt=0, le=100.0)
    # RAFT: how often a row's gold passage is among the k it trains on (else retrieval as it is).
    gold_passage_prob: float = Field(0.8, ge=0.0, le=1.0)
    query_side_only: bool = False  # LoRA on the question encoder only: the index never needs re-encoding
    seed: int = Field(0, ge=0, le=SEED_MAX)  # what every RNG the run seeds takes (numpy's is the narrowest)
    checkpoint_every: int = Field(50, ge=1)
    init: Literal["live", "base"] = "live"  # start from the domain's live adapter version, or from zero LoRA
    lora: LoraSettings | None = None  # None: the parent's settings when starting from it, else the defaults
    activation_checkpointing: bool = False  # generator activations recomputed in backward (less memory)
    quantize_generator: Literal["none", "4bit"] = "none"  # QLoRA: NF4 frozen generator (CUDA + bitsandbytes)
    eval_max_questions: int | None = Field(None, ge=1)  # EM/F1 on at most this many (recall uses them all)
    eval_max_new_tokens: int = Field(32, ge=1, le=256)

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> Hyperparameters:
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give steps or epochs, not both")
        return self


# Free-form labels a client attaches to a run (and reads back): at most 16, as fine-tuning APIs allow.
MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]
Metadata = Annotated[dict[MetadataKey, MetadataValue], Field(max_length=16)]


class RunRequest(_Strict):
    """The body of `POST /admin/adapt`."""

    domain: str = Field(pattern=DOMAIN_PATTERN)
    mode: Mode = "end2end"
    promote: PromotePolicy = "if_better"
    train: QaSource = QaSource(split="train", synthetic=SyntheticSource())
    evaluation: QaSource | None = QaSource(
        split="dev"
    )  # None: no evaluation (then promote cannot be if_better)
    reconstruction: ReconstructionSource | None = None
    hyperparameters: Hyperparameters = Hyperparameters()
    # What `promote: if_better` requires a significant gain on (None: F1, or recall@5 for retriever_only).
    promote_metric: Literal["recall@5", "f1"] | None = None
    metadata: Metadata = Field(default_factory=dict)

    @property
    def components(self) -> tuple[str, ...]:
        components = MODE_COMPONENTS[self.mode]
        if self.hyperparameters.query_side_only:
            components = tuple(c for c in components if c != "passage")
        return components

    @property
    def primary_metric(self) -> str:
        return self.promote_metric or ("recall@5" if self.mode == "retriever_only" else "f1")

    @property
    def refresh_every(self) -> int | None:
        """Steps between mid-run index rebuilds; None when the passage encoder does not train."""
        if "passage" not in self.components:
            return None
        return self.hyperparameters.index_refresh_every or DEFAULT_REFRESH_EVERY


# --- what a run reports -------------------------------------------------------------------------------------


class RunInfo(BaseModel):
    """What `GET /admin/runs/{id}` returns."""

    id: str
    domain: str
    mode: Mode
    state: RunState
    step: int = 0
    total_steps: int
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = None
    error_code: str | None = None
    metrics: dict[str, Any] = Field(default_factory=lambda: {"base": None, "final": None})
    adapter_version: str | None = None
    index_version: str | None = None
    promoted: bool = False
    latest: dict[str, float] | None = None  # loss, lr, examples_per_s of the last step
    parent: str | None = None  # the adapter version live when the run was submitted
    promote: PromotePolicy = "if_better"
    cancel_requested: bool = False
    metadata: dict[str, str] = Field(default_factory=dict)
    estimated_finish: datetime | None = None  # when training should end, at the pace of its recent steps


class RunRecord(RunInfo):
    """`runs/<id>/run.json`: the RunInfo plus what workers need (request, pinned data, lease)."""

    request: RunRequest
    qa_version: str | None = None  # the domain QA version the inputs came from, if any
    owner: str | None = None  # "<host>/<pid>/<token>" of the worker holding the run
    lease_until: datetime | None = None
    crashes: int = 0  # how many times the worker holding it died (a graceful stop does not count)
    checkpoint_step: int | None = None  # the step of the newest complete checkpoint
    etag: str | None = Field(default=None, exclude=True)

    def info(self) -> RunInfo:
        return RunInfo.model_validate(self.model_dump(include=set(RunInfo.model_fields)))


def now() -> datetime:
    return datetime.now(UTC)


def owner_token(token: str) -> str:
    return f"{socket.gethostname()}/{os.getpid()}/{token}"


def owner_is_dead_here(owner: str | None) -> bool:
    """True when `owner` names a process on this host that no longer exists (so its run can be taken at
    once)."""
    if not owner:
        return True
    host, _, rest = owner.partition("/")
    pid_text = rest.partition("/")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


# --- persistence --------------------------------------------------------------------------------------------


class RunStore:
    """Run records, events, inputs and the queue markers on the artifact store. Every record change is a
    compare-and-swap on run.json, so the HTTP process (cancel) and a worker (progress) never lose each
    other's writes, and a worker that lost its lease learns it at its next write."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    # record

    @staticmethod
    def record_key(run_id: str) -> str:
        return f"runs/{_check_id(run_id)}/run.json"

    def create(self, record: RunRecord) -> RunRecord:
        info = self.store.put_bytes(self.record_key(record.id), _dump(record), if_none_match=True)
        return record.model_copy(update={"etag": info.etag})

    def get(self, run_id: str) -> RunRecord:
        try:
            data, info = self.store.read(self.record_key(run_id))
        except ObjectNotFound as exc:
            raise RunNotFound(f"no run {run_id!r}") from exc
        return RunRecord.model_validate_json(data).model_copy(update={"etag": info.etag})

    def update(
        self,
        run_id: str,
        change: Callable[[RunRecord], RunRecord | None],
        *,
        owner: str | None = None,
        attempts: int = 20,
    ) -> RunRecord:
        """Read-modify-write run.json until the write wins. `change` returns the new record (None: no
        change). With `owner`, the record must still be held by it, else LeaseLost."""
        for _ in range(attempts):
            current = self.get(run_id)
            if owner is not None and current.owner != owner:
                raise LeaseLost(f"run {run_id} is now held by {current.owner!r}, not {owner!r}")
            updated = change(current.model_copy(deep=True))
            if updated is None:
                return current
            try:
                info = self.store.put_bytes(self.record_key(run_id), _dump(updated), if_match=current.etag)
            except PreconditionFailed:
                continue
            return updated.model_copy(update={"etag": info.etag})
        raise PreconditionFailed(f"run {run_id}: run.json kept changing under {attempts} attempts")

    def list(self) -> list[RunRecord]:
        records = []
        for info in self.store.list("runs/"):
            parts = info.key.split("/")
            if len(parts) == 3 and parts[2] == "run.json" and RUN_ID.fullmatch(parts[1]):
                try:
                    records.append(self.get(parts[1]))
                except RunNotFound:
                    continue
        return sorted(records, key=lambda r: (r.created_at, r.id), reverse=True)

    def delete(self, run_id: str) -> None:
        for info in list(self.store.list(f"runs/{_check_id(run_id)}/")):
            self.store.delete(info.key)
        self.store.delete(f"{QUEUE_PREFIX}{run_id}")

    # queue markers

    def enqueue(self, run_id: str) -> None:
        self.store.put_bytes(f"{QUEUE_PREFIX}{_check_id(run_id)}", b"")

    def dequeue(self, run_id: str) -> None:
        self.store.delete(f"{QUEUE_PREFIX}{_check_id(run_id)}")

    def active(self) -> list[str]:
        """Ids of runs queued or running, oldest first (ids sort by creation time)."""
        return sorted(info.key[len(QUEUE_PREFIX) :] for info in self.store.list(QUEUE_PREFIX))

    # inputs

    def put_input(self, run_id: str, name: str, data: bytes) -> str:
        key = f"runs/{_check_id(run_id)}/inputs/{name}"
        self.store.put_bytes(key, data)
        return key

    def get_input(self, run_id: str, name: str) -> bytes | None:
        try:
            return self.store.get_bytes(f"runs/{_check_id(run_id)}/inputs/{name}")
        except ObjectNotFound:
            return None

    # events

    def append_events(self, run_id: str, events: list[dict[str, Any]]) -> int:
        """Append events (each gets `seq` and `time` unless it has one); returns the last seq written."""
        if not events:
            return self.last_seq(run_id)
        prefix = f"runs/{_check_id(run_id)}/events/"
        pending = [dict(e) for e in events]
        while pending:
            pages = sorted(info.key for info in self.store.list(prefix))
            if pages:
                data, info = self.store.read(pages[-1])
                page_events, etag, page = json.loads(data), info.etag, int(pages[-1][len(prefix) : -5])
            else:
                page_events, etag, page = [], None, 0
            room = EVENTS_PER_PAGE - len(page_events)
            if room <= 0:
                page_events, etag, page = [], None, page + 1
                room = EVENTS_PER_PAGE
            seq = page * EVENTS_PER_PAGE + len(page_events)
            batch = []
            for event in pending[:room]:
                seq += 1
                batch.append({"seq": seq, "time": event.pop("time", None) or now().isoformat(), **event})
            key = f"{prefix}{page:06d}.json"
            body = json.dumps(page_events + batch, separators=(",", ":")).encode()
            try:
                if etag is None:
                    self.store.put_bytes(key, body, if_none_match=True)
                else:
                    self.store.put_bytes(key, body, if_match=etag)
            except PreconditionFailed:
                for event, written in zip(pending, batch):
                    event["time"] = written["time"]
                continue
            pending = pending[room:]
            last = seq
        return last

    def events(
        self, run_id: str, after: int = 0, limit: int | None = None
    ) -> tuple[list[dict[str, Any]], int]:
        """Events with seq > `after`, oldest first (at most `limit`), and the seq to pass as `after` next
        time."""
        self.get(run_id)
        prefix = f"runs/{_check_id(run_id)}/events/"
        first_page = max(after, 0) // EVENTS_PER_PAGE
        found = []
        for info in self.store.list(prefix):
            page = int(info.key[len(prefix) : -5])
            if page < first_page:
                continue
            if limit is not None and len(found) >= limit:
                break
            try:
                found += [e for e in json.loads(self.store.get_bytes(info.key)) if e["seq"] > after]
            except ObjectNotFound:
                continue
        found.sort(key=lambda e: e["seq"])
        found = found[:limit] if limit is not None else found
        return found, (found[-1]["seq"] if found else max(after, 0))

    def last_seq(self, run_id: str) -> int:
        prefix = f"runs/{_check_id(run_id)}/events/"
        pages = sorted(info.key for info in self.store.list(prefix))
        if not pages:
            return 0
        events = json.loads(self.store.get_bytes(pages[-1]))
        return events[-1]["seq"] if events else 0

    # checkpoints and mid-run indexes (storage.artifacts versions under the run)

    @staticmethod
    def checkpoints_prefix(run_id: str) -> str:
        return f"runs/{_check_id(run_id)}/checkpoints"

    @staticmethod
    def indexes_prefix(run_id: str) -> str:
        return f"runs/{_check_id(run_id)}/indexes"

    def latest_checkpoint(self, run_id: str) -> artifacts.Manifest | None:
        versions = artifacts.list_versions(self.store, self.checkpoints_prefix(run_id))
        return versions[-1] if versions else None

    def drop_artifacts(self, run_id: str, *, keep_checkpoints: int = 0) -> None:
        """Delete checkpoints (all but the newest `keep_checkpoints`) and, with none kept, mid-run indexes."""
        prefix = self.checkpoints_prefix(run_id)
        versions = artifacts.list_versions(self.store, prefix)
        for manifest in versions[: max(len(versions) - keep_checkpoints, 0)]:
            artifacts.delete_version(self.store, prefix, manifest.version)
        if keep_checkpoints == 0:
            for info in list(self.store.list(self.indexes_prefix(run_id) + "/")):
                self.store.delete(info.key)
            for info in list(self.store.list(prefix + "/")):
                self.store.delete(info.key)


def _check_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
        raise RunNotFound(f"no run {run_id!r}")
    return run_id


def _dump(record: RunRecord) -> bytes:
    return record.model_dump_json(indent=1).encode()


# --- validation: everything is checked before a run is queued -----------------------------------------------


@dataclass(frozen=True)
class Prepared:
    """A validated request: the record to queue and the inputs to freeze beside it."""

    record: RunRecord
    inputs: dict[str, bytes]


def prepare(
    store: ObjectStore, request: RunRequest, run_id: str, *, cuda_available: bool | None = None
) -> Prepared:
    """Check a request against the store and resolve its data; raises DomainNotFound or InvalidRun.

    `cuda_available` answers whether a 4-bit generator can be had (None: ask torch in this process)."""
    domains = DomainRegistry(store)
    hp = request.hyperparameters
    try:
        domains.get_domain(request.domain)
    except (StoreDomainNotFound, InvalidDomainName) as exc:  # an invalid name cannot name a domain either
        raise DomainNotFound(f"no domain named {request.domain!r}") from exc
    pointer = domains.live(request.domain)
    if pointer.index_version is None:
        raise InvalidRun(f"domain {request.domain!r} has no index yet; wait for its ingestion to finish")
    if request.mode == "generator_only" and hp.index_refresh_every is not None:
        raise InvalidRun(
            "generator_only keeps the passage encoder frozen: there is nothing to re-index "
            "(drop index_refresh_every)"
        )
    if request.mode == "generator_only" and hp.max_index_staleness is not None:
        raise InvalidRun("generator_only never re-indexes: drop max_index_staleness")
    if request.promote == "if_better" and request.evaluation is None:
        raise InvalidRun("promote=if_better compares evaluations: give an evaluation set or another policy")
    if request.evaluation is not None and (not request.evaluation.real or request.evaluation.synthetic):
        raise InvalidRun("evaluation takes real examples only: give a split, uri or examples, no synthetic")
    if request.mode == "generator_only" and hp.retriever_steps:
        raise InvalidRun("generator_only keeps the retriever frozen: it has no retriever phase")
    if hp.quantize_generator == "4bit":
        _check_qlora(cuda_available)

    index_manifest = domains.read_manifest(request.domain, ArtifactKind.INDEXES, pointer.index_version)
    passage_count = int(index_manifest.metadata.get("passage_count") or 0)
    if passage_count and hp.top_k > passage_count:
        raise InvalidRun(f"top_k={hp.top_k} but domain {request.domain!r} has only {passage_count} passages")

    parent = pointer.adapter_version
    lora = hp.lora
    if parent is not None and hp.init == "live":
        parent_lora = (
            domains.read_manifest(request.domain, ArtifactKind.ADAPTERS, parent).metadata.get("lora") or {}
        )
        inherited = _lora_from_metadata(parent_lora)
        if lora is not None and inherited is not None and lora != inherited:
            raise InvalidRun(
                f"the run starts from live adapter {parent}, whose LoRA settings differ from the "
                "requested ones; drop hyperparameters.lora or set init='base'"
            )
        lora = inherited or lora
    lora = lora or LoraSettings()

    qa_sets = QaSets(store)
    qa_version = None
    inputs: dict[str, bytes] = {}
    train, qa_version = _resolve_qa(store, qa_sets, request.domain, request.train, "training", qa_version)
    inputs["train.jsonl"] = to_jsonl(train)
    eval_count = 0
    if request.evaluation is not None:
        evaluation, qa_version = _resolve_qa(
            store, qa_sets, request.domain, request.evaluation, "evaluation", qa_version
        )
        inputs["eval.jsonl"] = to_jsonl(evaluation)
        eval_count = len(evaluation)
    recon = request.reconstruction
    if recon is not None and (recon.uri is not None or recon.sentences is not None):
        sentences = recon.sentences if recon.sentences is not None else _read_lines(store, recon.uri)
        sentences = [s.strip() for s in sentences if s.strip()]
        if not sentences:
            raise InvalidRun("the reconstruction corpus holds no sentence")
        inputs["reconstruction.txt"] = ("\n".join(sentences) + "\n").encode()
    elif recon is not None and hp.reconstruction_ratio == 0:
        raise InvalidRun("a reconstruction corpus is given but reconstruction_ratio is 0")

    retriever_steps = _retriever_steps(request, train, passage_count)
    joint_steps = _joint_steps(request, len(train))
    if retriever_steps + joint_steps == 0:
        raise InvalidRun("nothing to train: no retriever steps and no QA examples for the joint phase")
    stored_request = request.model_copy(
        update={
            "train": QaSource(uri=f"runs/{run_id}/inputs/train.jsonl", synthetic=request.train.synthetic),
            "evaluation": QaSource(uri=f"runs/{run_id}/inputs/eval.jsonl")
            if eval_count
            else request.evaluation,
            "reconstruction": (
                recon.model_copy(
                    update={"uri": f"runs/{run_id}/inputs/reconstruction.txt", "sentences": None}
                )
                if "reconstruction.txt" in inputs
                else recon
            ),
            "hyperparameters": hp.model_copy(update={"lora": lora, "retriever_steps": retriever_steps}),
        }
    )
    record = RunRecord(
        id=run_id,
        domain=request.domain,
        mode=request.mode,
        state=RunState.VALIDATING,
        total_steps=retriever_steps + joint_steps,
        created_at=now(),
        parent=parent,
        promote=request.promote,
        request=stored_request,
        qa_version=qa_version,
        metadata=request.metadata,
    )
    return Prepared(record=record, inputs=inputs)


def _retriever_steps(request: RunRequest, train: list[QaExample], passage_count: int) -> int:
    """Steps of the retriever phase: as asked, or `retriever_epochs` over the retrieval pairs (inverse-cloze
    pairs of every passage, real questions with gold passages, the passages questions are generated for)."""
    hp = request.hyperparameters
    if not {"question", "passage"} & set(request.components):
        return 0
    if hp.retriever_steps is not None:
        return hp.retriever_steps
    synthetic = request.train.synthetic
    pairs = sum(1 for e in train if e.passage_ids)
    if synthetic is not None and synthetic.ict is not None:
        pairs += min(passage_count, synthetic.ict.max_pairs or passage_count)
    if synthetic is not None and synthetic.generated is not None:
        pairs += min(passage_count, synthetic.generated.max_passages)
    return math.ceil(hp.retriever_epochs * pairs / hp.retriever_batch_size)


def _joint_steps(request: RunRequest, examples: int) -> int:
    """Steps of the joint (End2End) phase: as asked, or `epochs` over the real QA examples. A run with nothing
    to answer (no QA examples, none generated, no reconstruction) has no joint phase."""
    hp = request.hyperparameters
    synthetic = request.train.synthetic
    generated = synthetic is not None and synthetic.generated is not None
    if not examples and not generated and hp.reconstruction_ratio == 0:
        if hp.steps is not None or hp.epochs is not None:
            raise InvalidRun(
                "no QA examples to train the joint phase on: drop steps/epochs, or give QA "
                "examples, generated questions or a reconstruction_ratio"
            )
        return 0
    if hp.marginal_weight + hp.contrastive_weight + hp.lm_supervision_weight == 0:
        raise InvalidRun("marginal_weight, contrastive_weight and lm_supervision_weight are all 0")
    if hp.epochs is None:
        return hp.steps or DEFAULT_STEPS
    if not examples:
        raise InvalidRun("epochs count passes over the real QA examples and there are none: give steps")
    qa_rows_per_step = hp.batch_size * hp.grad_accumulation * (1.0 - hp.reconstruction_ratio)
    return max(1, math.ceil(hp.epochs * examples / qa_rows_per_step))


def _check_qlora(cuda_available: bool | None) -> None:
    import importlib.util

    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if not cuda_available:
        raise InvalidRun("quantize_generator='4bit' (QLoRA) needs a CUDA device; this host has none")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise InvalidRun(
            "quantize_generator='4bit' needs the bitsandbytes package (pip install 'ragadapt[gpu]')"
        )


def _lora_from_metadata(metadata: dict[str, Any]) -> LoraSettings | None:
    try:
        return LoraSettings.model_validate({c: metadata[c] for c in ("question", "passage", "generator")})
    except (KeyError, TypeError, ValidationError):
        return None


def lora_metadata(lora: LoraSettings) -> dict[str, Any]:
    """What an adapter version's manifest records about its LoRA (read back by `_lora_from_metadata`)."""
    return lora.model_dump()


def _resolve_qa(
    store: ObjectStore, qa_sets: QaSets, domain: str, source: QaSource, what: str, qa_version: str | None
) -> tuple[list[QaExample], str | None]:
    if not source.real:
        return [], qa_version
    if source.examples is not None:
        try:
            examples = [
                example_from_record(e.model_dump(exclude_none=True), line=i + 1)
                for i, e in enumerate(source.examples)
            ]
        except InvalidQaSet as exc:
            raise InvalidRun(f"{what} example {exc}") from exc
    elif source.uri is not None:
        data = _read_object(store, source.uri, what)
        try:
            examples = parse_qa_jsonl(data)
        except InvalidQaSet as exc:
            raise InvalidRun(f"{what} data {source.uri}: {exc}") from exc
    else:
        if qa_version is None:
            manifest = qa_sets.latest(domain)
            if manifest is None:
                raise InvalidRun(
                    f"domain {domain!r} has no QA set to take the {source.split!r} split from; "
                    "give examples or a uri"
                )
            qa_version = manifest.version
        examples = qa_sets.load(domain, qa_version).split(source.split)
    if not examples:
        where = f"split {source.split!r} of the QA set" if source.split else "the given data"
        raise InvalidRun(f"no {what} examples in {where}")
    return examples, qa_version


def _read_object(store: ObjectStore, uri: str, what: str) -> bytes:
    """A store key, or `s3://<bucket>/<key>` naming the store's own bucket (the one in `store.name()`)."""
    key = uri
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://") :].partition("/")
        served = store.name()  # what clients may see: no server paths
        if not served.startswith(f"s3://{bucket}@"):
            raise InvalidRun(f"{what} uri {uri} names bucket {bucket!r}, which is not this store ({served})")
    try:
        return store.get_bytes(key)
    except ObjectNotFound as exc:
        raise InvalidRun(f"{what} uri {uri} names no object in the store") from exc
    except InvalidKey as exc:
        raise InvalidRun(f"{what} uri {uri} is not a valid store key: {exc}") from exc


def _read_lines(store: ObjectStore, uri: str) -> list[str]:
    data = _read_object(store, uri, "reconstruction")
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise InvalidRun(f"reconstruction uri {uri} is not UTF-8 text ({exc.reason})") from exc


def lease_expiry(seconds: float) -> datetime:
    return now() + timedelta(seconds=seconds)

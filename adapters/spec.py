"""Adaptation runs, the contract: what a run asks for (`RunRequest`) and what it reports (`RunInfo`).

These are the HTTP API's models (`POST /admin/adapt`, `GET /admin/runs/{id}`) and what the SDK mirrors. How a
run is stored is `adapters.records`, which keeps its own model so that neither format moves with the other.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from backbone import COMPONENTS, AdapterSetConfig
from backbone.config import integral_floats
from storage.registry import DOMAIN_PATTERN

Mode = Literal["end2end", "generator_only", "retriever_only"]
PromotePolicy = Literal["never", "if_better", "always"]

# Which adapters of the set each mode trains (the others stay as they start: the parent's, or zero LoRA).
MODE_COMPONENTS: dict[str, tuple[str, ...]] = {
    "end2end": COMPONENTS,
    "generator_only": ("generator",),
    "retriever_only": ("question", "passage"),
}
DEFAULT_STEPS = 100
SEED_MAX = 2**32 - 1
DEFAULT_REFRESH_EVERY = 100


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


class _Strict(BaseModel):
    """A request part: unknown fields and values of another JSON type ("5" for 5, "true" for true) are
    errors, as the published JSON Schema states."""

    model_config = ConfigDict(extra="forbid", strict=True)
    _integral = model_validator(mode="before")(integral_floats)


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
    lora: AdapterSetConfig | None = None  # None: the parent's when starting from it, else the defaults
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


class RunResources(_Strict):
    """What a run asks a Ray cluster for (`runs.executor: ray`): its actor is placed on a node with that much
    free, and its torch threads are its CPUs. The local executor's worker processes take what settings
    `runs.threads` gives them and ignore this."""

    cpus: float = Field(1.0, gt=0, le=1024)
    gpus: float = Field(0.0, ge=0, le=64)
    memory_bytes: int | None = Field(None, ge=1 << 20)  # None: no memory reservation


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
    resources: RunResources | None = None  # None: the server's `runs.resources`

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
    resources: RunResources | None = None  # what it asks a Ray cluster for (None: the local executor's)

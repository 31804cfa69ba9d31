"""Running adaptation runs outside the HTTP process: the run pipeline, the worker processes and
`RunManager`.

`RunManager` (in the service process) validates and queues runs, answers reads from the store, and
supervises `max_concurrent` worker processes (multiprocessing "spawn": a fresh interpreter each, never a
forked torch). A worker loads the backbone once, then claims queued runs from the store one at a time
(compare-and-swap on run.json, with a lease it renews while it works) and executes them:

    evaluate what serves now -> train (RAG End2End + LoRA, async index refreshes) -> build and publish the
    index of the new passage encoder -> evaluate it -> publish the adapter version -> promote per policy

Each phase records its outcome in run.json before the next starts, so a run resumed after a crash (from its
last checkpoint) skips what is done. A worker that dies is noticed at once by the manager's monitor thread
(it waits on the process sentinels), which queues the run again and starts a new worker; a whole host that
died is noticed by the lease running out. Cancelling sets a flag in run.json that the worker reads between
micro-batches. Nothing live changes unless the run reaches promotion.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.synchronize
import os
import secrets
import shutil
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from multiprocessing.connection import wait as wait_for
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters.errors import LeaseLost, RunCancelled, RunFinished, RunInterrupted, RunNotFound
from adapters.qa import parse_qa_jsonl
from adapters.records import RunRecord, RunStore, lease_expiry, now, owner_is_dead_here, owner_token
from adapters.registry import AdapterRegistry
from adapters.spec import RunInfo, RunRequest, RunState
from adapters.validation import Prepared, lora_metadata, prepare
from storage import artifacts, new_version_id
from storage.errors import DomainNotFound, PreconditionFailed, StoreError, StoreUnavailable
from storage.registry import DomainRegistry
from storage.store import ObjectStore

if TYPE_CHECKING:
    from adapters.training import TrainerState
    from backbone import Backbone, BackboneConfig

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int, dict], None]  # (stage, done, total, latest step metrics)
SUBMIT_GRACE_S = 60.0  # a validating run with a queue marker older than this was queued by a submit that died


# --- one run's link to its record ---------------------------------------------------------------------------


class RunContext:
    """The executing side of one claimed run: cancel/stop checks, lease renewal, progress, events,
    checkpoints.

    Store writes are batched: step events and progress go out at most every `flush_s` seconds (and with
    every other event), the lease is renewed with them; run.json is read at every `tick` for a cancel
    request.
    """

    def __init__(
        self,
        runs: RunStore,
        record: RunRecord,
        owner: str,
        *,
        lease_s: float = 120.0,
        should_stop: Callable[[], bool] = lambda: False,
        on_progress: ProgressFn | None = None,
        flush_s: float = 1.0,
    ):
        self.runs = runs
        self.record = record
        self.owner = owner
        self.lease_s = lease_s
        self.should_stop = should_stop
        self.on_progress = on_progress
        self.flush_s = flush_s
        self._events: list[dict] = []
        self._progress: dict[str, Any] = {}
        self._flushed = time.monotonic()
        self._stage = ""
        self._pace: tuple[float, int] | None = None  # (time, step) of the first step seen by this worker
        # Called with each checkpoint (step, directory, trainer state); returns the adapter version it made.
        self.on_checkpoint: Callable[[int, Path, TrainerState], str | None] | None = None

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def latest(self) -> dict[str, float]:
        """The metrics of the last step (flushed to the record or not)."""
        return dict(self._progress.get("latest") or self.record.latest or {})

    def tick(self) -> None:
        if self.should_stop():
            raise RunInterrupted("the worker is stopping")
        current = self.runs.get(self.id)
        if current.owner != self.owner:
            raise LeaseLost(f"run {self.id} was taken over by {current.owner}")
        if current.cancel_requested:
            raise RunCancelled("cancelled on request")
        if time.monotonic() - self._flushed >= min(self.flush_s, self.lease_s / 4):
            self.flush()

    def stage(self, name: str, done: int = 0, total: int = 0) -> None:
        self._stage = name
        if self.on_progress is not None:
            self.on_progress(name, done, total, {})

    def progress(self, done: int, total: int) -> None:
        if self.on_progress is not None:
            self.on_progress(self._stage, done, total, {})
        self.tick()

    def event(self, kind: str, **payload: Any) -> None:
        self._events.append({"time": now().isoformat(), "kind": kind, **payload})
        self.flush()

    def step(self, step: int, latest: dict[str, float]) -> None:
        self._events.append({"time": now().isoformat(), "kind": "step", "step": step, **latest})
        self._progress = {"step": step, "latest": latest, "estimated_finish": self._estimate(step)}
        if self.on_progress is not None:
            self.on_progress("training", step, self.record.total_steps, latest)
        if time.monotonic() - self._flushed >= self.flush_s or step == self.record.total_steps:
            self.flush()

    def discard_pending(self) -> None:
        """Forget step events and progress not flushed yet (the run resumes from before them)."""
        self._events = []
        self._progress = {}

    def _estimate(self, step: int) -> datetime | None:
        """When training should end, at the pace of the steps this worker took so far."""
        clock = time.monotonic()
        if self._pace is None:
            self._pace = (clock, step)
            return self.record.estimated_finish
        started, first = self._pace
        if step <= first or clock <= started:
            return self.record.estimated_finish
        per_step = (clock - started) / (step - first)
        return now() + timedelta(seconds=per_step * (self.record.total_steps - step))

    def flush(self) -> None:
        if self._events:
            self.runs.append_events(self.id, self._events)
            self._events = []
        self.update(**self._progress)
        self._flushed = time.monotonic()

    def update(self, **fields: Any) -> RunRecord:
        """Change run.json fields (and renew the lease) if this worker still holds the run."""
        lease_s = self.lease_s

        def change(record: RunRecord) -> RunRecord:
            for name, value in fields.items():
                setattr(record, name, value)
            record.lease_until = lease_expiry(lease_s)
            return record

        self.record = self.runs.update(self.id, change, owner=self.owner)
        return self.record

    # RunHooks of the trainer

    def upload_index(self, directory: Path, build_id: str) -> str:
        """Store a mid-run index beside the run (a checkpoint refers to it); returns its version."""
        manifest = artifacts.publish(
            self.runs.store, self.runs.indexes_prefix(self.id), directory, {"build_id": build_id}
        )
        return manifest.version

    def checkpoint(self, step: int, directory: Path, state: TrainerState) -> None:
        """Publish a checkpoint directory, then drop older checkpoints and mid-run indexes it no longer
        needs."""
        store, prefix = self.runs.store, self.runs.checkpoints_prefix(self.id)
        manifest = artifacts.publish(store, prefix, directory, {"step": step, "index": state.index})
        self.runs.drop_artifacts(self.id, keep_checkpoints=1)
        referenced = state.index.get("version") if state.index.get("kind") == "run" else None
        for old in artifacts.list_versions(store, self.runs.indexes_prefix(self.id)):
            if old.version != referenced:
                artifacts.delete_version(store, self.runs.indexes_prefix(self.id), old.version)
        adapter_version = self.on_checkpoint(step, directory, state) if self.on_checkpoint else None
        self._events.append(
            {
                "time": now().isoformat(),
                "kind": "checkpoint",
                "step": step,
                "version": manifest.version,
                "adapter_version": adapter_version,
            }
        )
        self._progress = {**self._progress, "checkpoint_step": step}
        self.flush()


# --- the run pipeline ---------------------------------------------------------------------------------------


@dataclass
class Workspace:
    """What a run executes with: the backbone (per quantization), local scratch, a cache of index versions."""

    backbone_config: BackboneConfig
    work_dir: Path
    backbones: dict[str, Backbone] = field(default_factory=dict)  # loaded ones, by quantization

    def backbone(self, quantize: str = "none") -> Backbone:
        if quantize not in self.backbones:
            from adapters.training import backbone_for

            self.backbones.clear()  # one copy of the weights at a time
            self.backbones[quantize] = backbone_for(self.backbone_config, quantize)
        return self.backbones[quantize]


def execute_run(ctx: RunContext, workspace: Workspace) -> RunRecord:
    """Execute (or resume) a claimed run to its end; raises RunCancelled / RunInterrupted / LeaseLost /
    errors."""
    return _Execution(ctx, workspace).run()


class _Execution:
    """The phases of one run. Each records its outcome in run.json before the next starts, so a resumed run
    skips what is done: base metrics, training (from the last checkpoint), the new index, final metrics,
    the adapter version, promotion. Imports torch and the indexing stack lazily: the HTTP process imports
    this module too."""

    def __init__(self, ctx: RunContext, workspace: Workspace):
        from indexing.versions import IndexVersions

        self.ctx = ctx
        self.record = ctx.record
        self.request = self.record.request
        self.hp = self.request.hyperparameters
        self.store = ctx.runs.store
        self.bb = workspace.backbone(self.hp.quantize_generator)
        self.run_dir = workspace.work_dir / "runs" / self.record.id
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.domains = DomainRegistry(self.store)
        self.versions = IndexVersions(self.domains, workspace.work_dir / "index-cache")
        self.adapters = AdapterRegistry(self.store)
        self.key = f"run-{self.record.id}"
        self.attached: list[str] = []
        dev = ctx.runs.get_input(self.record.id, "eval.jsonl")
        self.dev = parse_qa_jsonl(dev) if dev else []
        ctx.on_checkpoint = self._publish_checkpoint

    @property
    def domain(self) -> str:
        return self.record.domain

    def run(self) -> RunRecord:
        try:
            if self.ctx.record.adapter_version is None:
                if self.dev and self.ctx.record.metrics.get("base") is None:
                    self._evaluate_base()
                trainer = self._train()
                index_version = self.ctx.record.index_version or self._index(trainer)
                if self.dev and self.ctx.record.metrics.get("final") is None:
                    final = self._evaluate(self.key, self._open_index(index_version), None, "final")
                    self.ctx.update(
                        metrics={
                            **self.ctx.record.metrics,
                            "final": final,
                            "improvement": self._improvement(final),
                        }
                    )
                self._publish(index_version)
            return self._finish()
        finally:
            for name in self.attached:
                if name in self.bb.adapter_sets:
                    self.bb.remove_adapter_set(name)

    # --- helpers --------------------------------------------------------------------------------------------

    def _attach_version(self, name: str, version: str) -> None:
        target = self.run_dir / f"adapter-{version}"
        if not target.exists():
            self.adapters.fetch(self.domain, version, target, expected_fingerprint=self.bb.fingerprint)
        self.bb.load_adapter_set(name, target)
        self.attached.append(name)

    def _open_index(self, version: str):
        return self.versions.open(
            self.domain, version, embedding_dim=self.bb.embedding_dim, fingerprint=self.bb.fingerprint
        )

    def _parent_index(self) -> str:
        parent = self.record.parent
        return (
            self.adapters.get(self.domain, parent).metadata.get("index_version")
            or self.versions.live(self.domain).index_version
        )

    def _evaluate(self, adapter: str | None, handle, version: str | None, phase: str) -> dict:
        from adapters.evaluation import evaluate

        self.ctx.stage(f"evaluating {phase}")
        report = evaluate(
            self.bb,
            adapter,
            handle,
            self.dev,
            top_k=self.hp.top_k,
            max_new_tokens=self.hp.eval_max_new_tokens,
            max_questions=self.hp.eval_max_questions,
            adapter_version=version,
            tick=self.ctx.tick,
            progress=self.ctx.progress,
        )
        self.ctx.event("eval", phase=phase, **{k: v for k, v in report.summary().items() if k != "samples"})
        return report.to_dict()

    def _improvement(self, final: dict) -> dict | None:
        """final - base on every figure, with paired bootstrap intervals (None without a base report)."""
        from adapters.evaluation import compare

        base = self.ctx.record.metrics.get("base")
        if base is None:
            return None
        return {name: d.to_dict() if d is not None else None for name, d in compare(final, base).items()}

    # --- phases ---------------------------------------------------------------------------------------------

    def _evaluate_base(self) -> None:
        """What serves now: the parent adapter version over its index, or the base backbone."""
        from adapters.training import base_index_version

        parent = self.record.parent
        if parent is not None:
            name = f"parent-{self.record.id}"
            self._attach_version(name, parent)
            base = self._evaluate(name, self._open_index(self._parent_index()), parent, "base")
            self.bb.remove_adapter_set(name)
            self.attached.remove(name)
        else:
            version = base_index_version(self.bb, self.versions, self.domain, work_dir=self.run_dir)
            base = self._evaluate(None, self._open_index(version), None, "base")
        self.ctx.update(metrics={**self.ctx.record.metrics, "base": base})

    def _train(self):
        """Attach the adapter set (from the last checkpoint, the parent, or zero LoRA) and train it."""
        import torch

        from adapters.synthetic import ict_pairs, qa_pairs, reconstruction_sentences
        from adapters.training import (
            IndexRefresher,
            Trainer,
            TrainerState,
            adapter_set_config,
            base_index_version,
            load_resume,
        )
        from indexing import IndexHandle

        record, hp, runs = self.record, self.hp, self.ctx.runs
        warm = record.parent is not None and hp.init == "live"
        checkpoint = runs.latest_checkpoint(record.id)
        resume = None
        if checkpoint is not None:
            target = self.run_dir / f"checkpoint-{checkpoint.version}"
            shutil.rmtree(target, ignore_errors=True)
            artifacts.download(self.store, runs.checkpoints_prefix(record.id), checkpoint.version, target)
            self.bb.load_adapter_set(self.key, target / "adapters")
            self.attached.append(self.key)
            resume = load_resume(target)
            self.ctx.event(
                "state",
                state="running",
                resumed_from=resume.state.step,
                checkpoint=checkpoint.version,
                index=resume.state.index.get("kind"),
            )
        elif warm:
            self._attach_version(self.key, record.parent)
        else:
            torch.manual_seed(hp.seed)  # LoRA A matrices start random: the run's seed decides them
            self.bb.add_adapter_set(self.key, adapter_set_config(hp.lora))
            self.attached.append(self.key)

        # The index training searches first: the checkpoint's, the parent's, or one of the base encoder.
        index_dir = None
        if resume is not None:
            start_version = resume.state.index["start_version"]
        elif warm:
            start_version = self._parent_index()
        else:
            start_version = base_index_version(self.bb, self.versions, self.domain, work_dir=self.run_dir)
        if resume is not None and resume.state.index.get("kind") == "run":
            ref = resume.state.index
            index_dir = self.run_dir / f"index-{ref['version']}"
            if not index_dir.exists():
                artifacts.download(self.store, runs.indexes_prefix(record.id), ref["version"], index_dir)
            handle = IndexHandle.open(
                index_dir,
                domain=self.domain,
                version=f"run-{ref['build_id']}",
                embedding_dim=self.bb.embedding_dim,
                fingerprint=self.bb.fingerprint,
            )
        else:
            handle = self._open_index(start_version)
        self.start_version = start_version

        sentences: list[str] = []
        if hp.reconstruction_ratio > 0:
            given = runs.get_input(record.id, "reconstruction.txt")
            if given is not None:
                sentences = [s for s in given.decode("utf-8").splitlines() if s.strip()]
            else:
                recon = self.request.reconstruction
                settings = recon.model_dump() if recon is not None else {}
                sentences = reconstruction_sentences(
                    handle.passages,
                    min_words=settings.get("min_words", 6),
                    max_words=settings.get("max_words", 48),
                    limit=settings.get("max_sentences", 5000),
                    seed=hp.seed,
                )

        train = parse_qa_jsonl(runs.get_input(record.id, "train.jsonl") or b"")
        passages = list(handle.passages)
        synthetic = self.request.train.synthetic
        generated = self._generated(passages, train) if synthetic and synthetic.generated else []
        pairs: list = []
        if hp.retriever_steps:
            pairs = qa_pairs(train, passages) + qa_pairs(generated, passages, "generated")
            if synthetic is not None and synthetic.ict is not None:
                ict = synthetic.ict
                pairs += ict_pairs(
                    passages,
                    seed=hp.seed,
                    keep_sentence=ict.keep_sentence,
                    min_words=ict.min_words,
                    max_words=ict.max_words,
                    limit=ict.max_pairs,
                )
        total_steps = record.total_steps
        if not (train or generated or sentences) and hp.retriever_steps:
            # Generated questions were asked for and none passed the round trip: no joint phase to run.
            total_steps = hp.retriever_steps
            if record.total_steps != total_steps:
                self.ctx.update(total_steps=total_steps)
                self.ctx.event("phase", name="joint", skipped="no QA examples: none given, none generated")
        if resume is None:
            kinds = Counter(pair.kind for pair in pairs)
            self.ctx.event(
                "data",
                examples=len(train),
                generated=len(generated),
                sentences=len(sentences),
                retriever_steps=hp.retriever_steps or 0,
                pairs=dict(sorted(kinds.items())),
            )
        self.ctx.update(started_at=self.ctx.record.started_at or now())
        self.ctx.stage("training", resume.state.step if resume else 0, total_steps)
        refresher = (
            IndexRefresher(self.domain, self.bb, self.versions, self.run_dir)
            if self.request.refresh_every
            else None
        )
        trainer = Trainer(
            self.bb,
            self.key,
            self.request,
            total_steps,
            train,
            sentences,
            handle,
            index_dir,
            self.ctx,
            refresher=refresher,
            work_dir=self.run_dir,
            resume=resume,
            state=TrainerState(
                index={"kind": "domain", "version": start_version, "start_version": start_version}
            ),
            generated=generated,
            pairs=pairs,
        )
        trainer.train()
        self.ctx.flush()
        return trainer

    def _generated(self, passages: list, train: list) -> list:
        """Generated questions about the passages: from the store's cache, else written now by the base
        generator (round-trip checked against the base index) and cached for the next run."""
        from adapters.synthetic import GenerationConfig, SyntheticCache, generate_questions
        from adapters.training import base_index_version

        settings = self.request.train.synthetic.generated
        config = GenerationConfig(**settings.model_dump(), seed=self.hp.seed)
        cache = SyntheticCache(self.store)
        identity = cache.identity(passages, train, self.bb.fingerprint, config)
        found = cache.find(self.domain, identity)
        if found is None:
            self.ctx.stage("generating questions")
            base = self._open_index(
                base_index_version(self.bb, self.versions, self.domain, work_dir=self.run_dir)
            )
            found = generate_questions(
                self.bb, passages, train, base, config, tick=self.ctx.tick, progress=self.ctx.progress
            )
            cache.put(self.domain, identity, found)
            self.ctx.event("generated", passages=min(len(passages), config.max_passages), kept=len(found))
        return found

    def _index(self, trainer) -> str:
        """The index of the new passage encoder, published as a domain index version (nothing goes live); a
        run that kept the passage encoder frozen serves from the index it started with."""
        from adapters.training import build_domain_index

        if "passage" in self.request.components:
            self.ctx.stage("indexing")
            start = self.versions.build_info(self.domain, self.start_version)
            version = build_domain_index(
                self.bb,
                self.key,
                list(trainer.index.passages),
                self.versions,
                self.domain,
                passages_version=start.passages_version,
                config=start.config,
                work_dir=self.run_dir,
                on_progress=lambda _stage, done, total: self.ctx.progress(done, total),
            )
            self.ctx.event("rebuild", state="published", index_version=version, step=trainer.state.step)
        else:
            version = self.start_version
        self.ctx.update(index_version=version)
        return version

    def _publish_checkpoint(self, step: int, directory: Path, state: TrainerState) -> str | None:
        """A checkpoint's adapter set as an adapter version of the domain, which can be evaluated or promoted
        like any other (its index: the domain index the checkpoint trained against, else the one the run
        started from). The last step's is the run's own version, published with its evaluation."""
        if step >= self.record.total_steps:
            return None
        index = state.index
        manifest = self.adapters.publish(
            self.domain,
            directory / "adapters",
            backbone_fingerprint=self.bb.fingerprint,
            run_id=self.record.id,
            metrics={"checkpoint": self.ctx.latest, "mode": self.request.mode},
            parent=self.record.parent,
            index_version=index["version"] if index.get("kind") == "domain" else index["start_version"],
            lora=lora_metadata(self.hp.lora),
            checkpoint_step=step,
        )
        return manifest.version

    def _publish(self, index_version: str) -> None:
        self.ctx.stage("publishing")
        target = self.run_dir / "final"
        shutil.rmtree(target, ignore_errors=True)
        self.bb.save_adapter_set(self.key, target)
        manifest = self.adapters.publish(
            self.domain,
            target,
            backbone_fingerprint=self.bb.fingerprint,
            run_id=self.record.id,
            metrics={**_without_outcomes(self.ctx.record.metrics), "mode": self.request.mode},
            parent=self.record.parent,
            index_version=index_version,
            lora=lora_metadata(self.hp.lora),
        )
        self.ctx.update(adapter_version=manifest.version)

    def _finish(self) -> RunRecord:
        """Promote per policy, drop the checkpoints (the adapter version is out), then mark the run
        succeeded."""
        record = self.ctx.record
        promoted, reason = _promote(self.domains, record)
        self.ctx.update(promoted=promoted, step=record.total_steps)
        self.ctx.runs.drop_artifacts(record.id)
        # The event before the state: whoever sees the run finished finds its last event already logged.
        self.ctx.event(
            "state",
            state="succeeded",
            adapter_version=record.adapter_version,
            index_version=record.index_version,
            promoted=promoted,
            promotion=reason,
        )
        self.ctx.update(state=RunState.SUCCEEDED, finished_at=now())
        return self.ctx.record


def _without_outcomes(metrics: dict) -> dict:
    """Run metrics without the reports' per-question outcomes (what an adapter version's manifest keeps)."""
    return {
        name: {k: v for k, v in value.items() if k != "per_question"}
        if name in ("base", "final") and value
        else value
        for name, value in metrics.items()
    }


def _promote(domains: DomainRegistry, record: RunRecord) -> tuple[bool, str]:
    """Apply the run's promotion policy; returns (promoted, why)."""
    from adapters.evaluation import is_better

    if record.promoted:
        return True, "promoted"
    policy = record.promote
    if policy == "never":
        return False, "policy is never"
    pointer = domains.live(record.domain)
    if pointer.adapter_version == record.adapter_version:  # promoted before a crash could record it
        return True, "promoted"
    reason = "promoted"
    if policy == "if_better":
        base, final = record.metrics.get("base"), record.metrics.get("final")
        if final is None:
            return False, "no evaluation to compare"
        better, why = is_better(final, base, record.request.primary_metric)
        if not better:
            return False, f"not significantly better than what serves: {why}"
        reason = f"better than what served: {why}"
        if pointer.adapter_version != record.parent:
            return (
                False,
                f"the live adapter changed during the run ({record.parent} -> {pointer.adapter_version})",
            )
    try:
        domains.promote(
            record.domain,
            record.adapter_version,
            index_version=record.index_version,
            expected_etag=pointer.etag if policy == "if_better" else None,
        )
    except PreconditionFailed:
        return False, "the live pointer changed while promoting; promote by hand if still wanted"
    return True, reason


# --- claiming and finishing runs ----------------------------------------------------------------------------


def claim_next(runs: RunStore, owner: str, *, lease_s: float, max_crashes: int) -> RunRecord | None:
    """Take the oldest queued run (or a running one whose worker is gone); None when there is none."""
    for run_id in runs.active():
        try:
            record = runs.get(run_id)
        except RunNotFound:  # a marker without a record: a submit that failed half-way
            runs.dequeue(run_id)
            continue
        if record.state.finished:
            runs.dequeue(run_id)
            continue
        if not _claimable(record):
            continue
        claimed = _claim(runs, run_id, owner, lease_s, max_crashes)
        if claimed is not None:
            return claimed
    return None


def _claimable(record: RunRecord) -> bool:
    if record.state == RunState.QUEUED:
        return True
    if record.state == RunState.VALIDATING:  # queued, but its submit ended before it could say so
        return record.created_at < now() - timedelta(seconds=SUBMIT_GRACE_S)
    if record.state != RunState.RUNNING:
        return False
    expired = record.lease_until is None or record.lease_until < now()
    return expired or owner_is_dead_here(record.owner)


def _claim(runs: RunStore, run_id: str, owner: str, lease_s: float, max_crashes: int) -> RunRecord | None:
    crashed = submit_interrupted = False

    def take(record: RunRecord) -> RunRecord | None:
        nonlocal crashed, submit_interrupted
        if not _claimable(record):
            return None
        crashed = record.state == RunState.RUNNING  # its previous worker vanished without releasing it
        submit_interrupted = record.state == RunState.VALIDATING
        if crashed:
            record.crashes += 1
            if record.crashes > max_crashes:
                record.state, record.finished_at = RunState.FAILED, now()
                record.error_code = "worker_died"
                record.error = f"the worker running it died {record.crashes} times"
                record.owner = record.lease_until = None
                return record
        record.state, record.owner, record.lease_until = RunState.RUNNING, owner, lease_expiry(lease_s)
        return record

    try:
        record = runs.update(run_id, take)
    except PreconditionFailed:
        return None
    if record.state == RunState.FAILED:
        runs.append_events(run_id, [{"kind": "state", "state": "failed", "error": record.error}])
        runs.dequeue(run_id)
        runs.drop_artifacts(run_id)
        return None
    if record.owner != owner:
        return None
    interrupted = [{"kind": "state", "state": "queued", "reason": "its submit ended before it said so"}]
    runs.append_events(
        run_id,
        [
            *(interrupted if submit_interrupted else []),
            {
                "kind": "state",
                "state": "running",
                "owner": owner,
                "after_crash": crashed,
                "checkpoint_step": record.checkpoint_step,
            },
        ],
    )
    return record


def requeue(
    runs: RunStore, run_id: str, *, reason: str, owner: str | None = None, crashed: bool = False
) -> None:
    """Put a running run back in the queue (its worker stopped or died); it resumes from its last
    checkpoint."""

    def back(record: RunRecord) -> RunRecord | None:
        if record.state != RunState.RUNNING or (owner is not None and record.owner != owner):
            return None
        record.state, record.owner, record.lease_until = RunState.QUEUED, None, None
        if crashed:
            record.crashes += 1
        return record

    record = runs.update(run_id, back)
    if record.state == RunState.QUEUED:
        runs.append_events(
            run_id,
            [{"kind": "state", "state": "queued", "reason": reason, "resumes_from": record.checkpoint_step}],
        )


def run_claimed(ctx: RunContext, workspace: Workspace) -> RunRecord:
    """Execute a claimed run and settle its end state, whatever happens.

    A store outage is not the run's fault: the run goes back to the queue once the store answers again and
    resumes from its last checkpoint. Its end state is written when the store lets it through."""
    runs, run_id = ctx.runs, ctx.id
    try:
        return execute_run(ctx, workspace)
    except RunInterrupted as exc:
        ctx.flush()
        requeue(runs, run_id, reason=str(exc), owner=ctx.owner)
        raise
    except LeaseLost:
        log.warning("run %s was taken over by another worker; leaving it", run_id)
        raise
    except StoreUnavailable as exc:
        log.warning("run %s paused: %s", run_id, exc)
        # The steps since the last flush are done again after the resume; their events are not written.
        ctx.discard_pending()
        reason = "the store was unavailable; resuming from the last checkpoint"
        _when_store_answers(
            lambda: requeue(runs, run_id, reason=reason, owner=ctx.owner),
            ctx.should_stop,
            f"queueing run {run_id} again",
        )
        raise
    except RunCancelled:
        _when_store_answers(
            lambda: _finish(ctx, RunState.CANCELLED, None, None),
            ctx.should_stop,
            f"recording that run {run_id} was cancelled",
        )
        raise
    except KeyboardInterrupt:  # Ctrl-C on `ragadapt adapt`: the person stopped it
        _finish(ctx, RunState.CANCELLED, None, "interrupted from the keyboard")
        raise
    except Exception as exc:
        log.exception("run %s failed", run_id)
        code, error = getattr(exc, "code", None) or "run_failed", f"{type(exc).__name__}: {exc}"
        _when_store_answers(
            lambda: _finish(ctx, RunState.FAILED, code, error),
            ctx.should_stop,
            f"recording that run {run_id} failed",
        )
        raise
    finally:
        shutil.rmtree(workspace.work_dir / "runs" / run_id, ignore_errors=True)
        if ctx.record.state.finished:
            try:
                runs.dequeue(run_id)
                runs.drop_artifacts(run_id)
            except StoreError as exc:  # claim_next drops the marker of a finished run; gc sweeps the rest
                log.warning("cleaning up after run %s failed: %s", run_id, exc)


def _when_store_answers(action: Callable[[], object], should_stop: Callable[[], bool], what: str) -> None:
    """Call `action` until the store lets it through, backing off from 1 s to 10 s between tries. A worker
    told to stop gives up: the run's lease then runs out (or the next start finds its worker gone) and the
    run is taken over."""
    delay = 1.0
    while True:
        try:
            action()
            return
        except StoreUnavailable as exc:
            if should_stop():
                log.warning("%s: gave up, the worker stops and the store is unavailable (%s)", what, exc)
                return
            log.warning("%s: the store is unavailable (%s); trying again in %.0fs", what, exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def _finish(ctx: RunContext, state: RunState, code: str | None, error: str | None) -> None:
    with contextlib.suppress(LeaseLost, PreconditionFailed):
        ctx.flush()
    ctx.event("state", state=state.value, **({"error": error, "code": code} if error else {}))
    ctx.update(state=state, finished_at=now(), error=error, error_code=code)


# --- worker processes ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs, picklable."""

    store: Any  # an ObjectStore that pickles (LocalStore), or a storage.StoreConfig
    backbone_config: BackboneConfig
    work_dir: Path
    token: str
    lease_s: float
    poll_s: float
    max_crashes: int
    threads: int | None = None  # torch threads of the worker (None: torch's default)


def _open(store: Any) -> ObjectStore:
    if isinstance(store, ObjectStore):
        return store
    from storage import open_store

    return open_store(store)


def worker_main(
    spec: WorkerSpec,
    stop: multiprocessing.synchronize.Event,
    wake: multiprocessing.synchronize.Event,
    parent_pid: int,
) -> None:
    """A worker process: load the backbone, then claim and execute runs until told to stop."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s [worker] %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the manager decides
    if spec.threads is not None:
        import torch

        torch.set_num_threads(spec.threads)
    runs = RunStore(_open(spec.store))
    owner = owner_token(spec.token)
    workspace = Workspace(spec.backbone_config, worker_scratch(spec.work_dir, spec.token))
    workspace.backbone()

    def should_stop() -> bool:
        return stop.is_set() or os.getppid() != parent_pid

    delay = 0.0
    try:
        while not should_stop():
            try:
                record = claim_next(runs, owner, lease_s=spec.lease_s, max_crashes=spec.max_crashes)
            except Exception:  # store down, an unreadable record: a worker outlives it and tries again
                delay = min(max(delay * 2, 1.0), 30.0)
                log.warning("claiming a run failed; trying again in %.0fs", delay, exc_info=True)
                stop.wait(delay)
                continue
            delay = 0.0
            if record is None:
                wake.wait(spec.poll_s)
                wake.clear()
                continue
            ctx = RunContext(runs, record, owner, lease_s=spec.lease_s, should_stop=should_stop)
            try:
                run_claimed(ctx, workspace)
            except Exception:  # the run's end (or its return to the queue) is recorded; take the next one
                continue
    finally:
        shutil.rmtree(workspace.work_dir, ignore_errors=True)


def worker_scratch(work_dir: Path, token: str) -> Path:
    """The local scratch directory of the worker process with `token` (removed when it ends or dies)."""
    return Path(work_dir) / f"worker-{token}"


@dataclass
class _Worker:
    token: str
    process: multiprocessing.process.BaseProcess
    started: float = field(default_factory=time.monotonic)

    @property
    def owner(self) -> str:
        return f"{socket.gethostname()}/{self.process.pid}/{self.token}"


class RunManager:
    """Queues adaptation runs and runs them in `max_concurrent` worker processes (one by default)."""

    def __init__(
        self,
        store: ObjectStore,
        backbone_config: BackboneConfig,
        work_dir: Path,
        *,
        max_concurrent: int = 1,
        store_config: Any = None,
        lease_s: float = 120.0,
        poll_s: float = 1.0,
        stop_timeout_s: float = 60.0,
        max_crashes: int = 2,
        cuda_available: bool | None = None,
        threads: int | None = None,
    ):
        """`store_config` (a storage.StoreConfig) lets workers open stores that do not pickle (S3); a
        LocalStore travels as it is. `cuda_available` is what validation assumes about the workers' device
        (None: ask torch here). A run whose worker dies more than `max_crashes` times fails. `threads`: torch
        threads of each worker (None: torch's default, every core)."""
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be >= 1")
        self.runs = RunStore(store)
        self.backbone_config = backbone_config
        self.work_dir = Path(work_dir)
        self.max_concurrent = max_concurrent
        self._store_spec = store_config if store_config is not None else store
        self._lease_s, self._poll_s, self._stop_timeout_s = lease_s, poll_s, stop_timeout_s
        self._max_crashes = max_crashes
        self._cuda_available = cuda_available
        self._threads = threads
        self._context = multiprocessing.get_context("spawn")
        self._stop = self._context.Event()
        self._wake = self._context.Event()
        self._workers: list[_Worker] = []
        self._quick_deaths = 0  # workers in a row that died within a minute of their start
        self._monitor: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    # --- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Queue again the runs whose worker on this host is gone (a restart), then start the workers. With
        the store down, the workers take those runs over themselves once it is back."""
        with self._lock:
            if self._monitor is not None:
                raise RuntimeError("RunManager already started")
            try:
                for run_id in self.runs.active():
                    record = self.runs.get(run_id)
                    if record.state == RunState.RUNNING and owner_is_dead_here(record.owner):
                        requeue(
                            self.runs, run_id, reason="its worker is gone (restart); resuming", crashed=True
                        )
            except StoreError as exc:
                log.warning("could not queue again the runs of workers gone since the last start: %s", exc)
            self._quick_deaths = 0
            self._stop.clear()
            self._stopping.clear()
            self._workers = [self._spawn() for _ in range(self.max_concurrent)]
            self._monitor = threading.Thread(target=self._watch, name="run-workers", daemon=True)
            self._monitor.start()

    def stop(self) -> None:
        """Ask workers to stop (a running run checkpoints and goes back to the queue), wait, then end them."""
        with self._lock:
            if self._monitor is None:
                return
            self._stopping.set()
            self._stop.set()
            self._wake.set()
            deadline = time.monotonic() + self._stop_timeout_s
            for worker in self._workers:
                worker.process.join(max(deadline - time.monotonic(), 0.1))
                if worker.process.is_alive():
                    log.warning("run worker %s did not stop in time; terminating it", worker.process.pid)
                    worker.process.terminate()
                    worker.process.join(10)
                    if worker.process.is_alive():
                        worker.process.kill()
                        worker.process.join(5)
            self._monitor.join(10)
            self._monitor = None
            self._workers = []

    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.process.pid is not None]

    def scratch(self) -> tuple[list[Path], set[Path]]:
        """The workers' scratch directories under the work directory, and those of the workers alive now."""
        with self._lock:
            alive = {worker_scratch(self.work_dir, w.token) for w in self._workers if w.process.is_alive()}
        return list(self.work_dir.glob("worker-*")), alive

    @property
    def alive_workers(self) -> int:
        return sum(w.process.is_alive() for w in self._workers)

    def _spawn(self) -> _Worker:
        token = secrets.token_hex(4)
        spec = WorkerSpec(
            self._store_spec,
            self.backbone_config,
            self.work_dir,
            token,
            self._lease_s,
            self._poll_s,
            self._max_crashes,
            self._threads,
        )
        # Not a daemon: a worker starts index-rebuild processes of its own, which daemons may not.
        process = self._context.Process(
            target=worker_main, args=(spec, self._stop, self._wake, os.getpid()), name=f"run-worker-{token}"
        )
        process.start()
        log.info("started run worker %s (pid %s)", token, process.pid)
        return _Worker(token, process)

    @property
    def supervisor(self) -> str:
        """`running`; `stopped` before start and after stop; `dead` when the thread that replaces dead
        workers ended while it should run (nothing replaces a dead worker then: `/readyz` says so)."""
        if self._monitor is None:
            return "stopped"
        return "running" if self._monitor.is_alive() else "dead"

    def _watch(self) -> None:
        """Supervise the workers until stopped. Nothing may end this thread: a store outage or anything
        unexpected is logged and the next round tries again."""
        while not self._stopping.is_set():
            try:
                self._replace_dead_workers()
            except Exception:
                log.exception("supervising the run workers failed; trying again")
                self._stopping.wait(1.0)

    def _replace_dead_workers(self) -> None:
        """Wait on the workers' sentinels; a worker that died has its scratch directory swept and its run
        queued again, and is replaced (after a pause that grows while workers keep dying young)."""
        workers = list(self._workers)
        wait_for([w.process.sentinel for w in workers], timeout=1.0)
        for worker in workers:
            if self._stopping.is_set():
                return
            if worker.process.is_alive():
                continue
            worker.process.join(1)
            code = worker.process.exitcode
            log.error("run worker %s (pid %s) died with exit code %s", worker.token, worker.process.pid, code)
            shutil.rmtree(worker_scratch(self.work_dir, worker.token), ignore_errors=True)
            try:
                self._release_runs_of(worker, f"worker pid {worker.process.pid} died (exit code {code})")
            except StoreError as exc:  # its replacement takes its runs over once the store is back
                log.warning("could not queue the runs of worker %s again: %s", worker.token, exc)
            self._quick_deaths = self._quick_deaths + 1 if time.monotonic() - worker.started < 60 else 0
            if self._quick_deaths > 1:
                pause = min(2.0 ** (self._quick_deaths - 1), 60.0)
                log.warning("run workers keep dying young; replacing this one in %.0fs", pause)
                if self._stopping.wait(pause):
                    return
            with self._lock:
                if self._stopping.is_set():
                    return
                self._workers[self._workers.index(worker)] = self._spawn()
            self._wake.set()

    def _release_runs_of(self, worker: _Worker, reason: str) -> None:
        for run_id in self.runs.active():
            try:
                requeue(self.runs, run_id, reason=reason, owner=worker.owner, crashed=True)
            except Exception:
                log.exception("could not queue run %s again after its worker died", run_id)

    # --- the interface the service calls --------------------------------------------------------------------

    def submit(self, request: RunRequest) -> RunInfo:
        """Validate (DomainNotFound, InvalidRun) and queue a run; returns it queued."""
        record = queue_run(self.runs, request, cuda_available=self._cuda_available)
        self._wake.set()
        return record.info()

    def get(self, run_id: str) -> RunInfo:
        return self.runs.get(run_id).info()

    def list(self, domain: str | None = None) -> list[RunInfo]:
        return [r.info() for r in self.runs.list() if domain is None or r.domain == domain]

    def events(self, run_id: str, after: int = 0, limit: int = 100) -> tuple[list[dict], int, bool]:
        """At most `limit` events after seq `after`, the seq to ask after next, and whether more follow."""
        events, _ = self.runs.events(run_id, after, limit + 1)
        page = events[:limit]
        return page, (page[-1]["seq"] if page else max(after, 0)), len(events) > limit

    def checkpoints(self, run_id: str) -> list[dict[str, Any]]:
        """The adapter versions published at the run's checkpoints, newest first (its last step's version is
        the run's `adapter_version`)."""
        record = self.runs.get(run_id)
        try:
            versions = AdapterRegistry(self.runs.store).list(record.domain)
        except DomainNotFound:  # deleted since
            return []
        found = [
            {
                "step": m.metadata["checkpoint_step"],
                "created_at": m.created_at,
                "adapter_version": m.version,
                "metrics": dict((m.metadata.get("metrics") or {}).get("checkpoint") or {}),
            }
            for m in versions
            if m.metadata.get("run_id") == run_id and m.metadata.get("checkpoint_step") is not None
        ]
        return sorted(found, key=lambda c: c["step"], reverse=True)

    def cancel(self, run_id: str) -> RunInfo:
        """Cancel a run: a queued one at once, a running one at its worker's next micro-batch (the returned
        info says `cancel_requested` until then). RunFinished if it already ended."""

        def change(record: RunRecord) -> RunRecord | None:
            if record.state.finished:
                raise RunFinished(f"run {run_id} already {record.state.value}")
            if record.cancel_requested:
                return None
            record.cancel_requested = True
            if record.state in (RunState.QUEUED, RunState.VALIDATING):
                record.state, record.finished_at = RunState.CANCELLED, now()
            return record

        record = self.runs.update(run_id, change)
        if record.state == RunState.CANCELLED:
            self.runs.append_events(run_id, [{"kind": "state", "state": "cancelled"}])
            self.runs.dequeue(run_id)
            self.runs.drop_artifacts(run_id)
        else:
            self.runs.append_events(
                run_id, [{"kind": "state", "state": record.state.value, "cancel_requested": True}]
            )
        return record.info()


def queue_run(
    runs: RunStore,
    request: RunRequest,
    *,
    cuda_available: bool | None = None,
    owner: str | None = None,
    lease_s: float = 120.0,
) -> RunRecord:
    """Validate `request`, persist it with its frozen inputs and queue it. With `owner` the run is created
    already claimed by that owner (the CLI runs it in its own process)."""
    run_id = new_version_id()
    prepared: Prepared = prepare(runs.store, request, run_id, cuda_available=cuda_available)
    record = runs.create(prepared.record)
    try:
        for name, data in prepared.inputs.items():
            runs.put_input(run_id, name, data)
        # The marker before the state: a crash between the two leaves a validating run with a marker, which
        # claim_next takes after SUBMIT_GRACE_S (the other order left a queued run no worker could see).
        runs.enqueue(run_id)

        def queued(r: RunRecord) -> RunRecord | None:
            if r.state != RunState.VALIDATING:  # taken by a worker meanwhile
                return None
            if owner is None:
                r.state = RunState.QUEUED
            else:
                r.state, r.owner, r.lease_until = RunState.RUNNING, owner, lease_expiry(lease_s)
            return r

        record = runs.update(run_id, queued)
        runs.append_events(
            run_id,
            [
                {"kind": "state", "state": "validating"},
                {"kind": "state", "state": record.state.value, "total_steps": record.total_steps},
            ],
        )
    except BaseException:
        runs.delete(run_id)
        raise
    return record

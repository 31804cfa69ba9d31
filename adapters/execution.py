"""Executing one claimed adaptation run, in a run worker process or in `ragadapt adapt`:

    evaluate what serves now -> train (RAG End2End + LoRA, async index refreshes) -> build and publish the
    index of the new passage encoder -> evaluate it -> publish the adapter version -> promote per policy

Each phase records its outcome in run.json before the next starts, so a run resumed after a crash (from its
last checkpoint) skips what is done. Cancelling sets a flag in run.json that the worker reads between
micro-batches. Nothing live changes unless the run reaches promotion. Torch and the indexing stack are
imported when a run executes, not with this module.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from adapters.errors import LeaseLost, RunCancelled, RunInterrupted
from adapters.lease import RunContext
from adapters.promotion import promote
from adapters.qa import parse_qa_jsonl
from adapters.queue import finish, requeue
from adapters.records import RunRecord, now
from adapters.registry import AdapterRef, AdapterRegistry
from adapters.spec import RunState
from storage import artifacts
from storage.errors import StoreError, StoreUnavailable
from storage.registry import DomainRegistry

if TYPE_CHECKING:
    from adapters.qa import QaExample
    from adapters.synthetic import RetrievalPair
    from adapters.training import Resume, TrainerState
    from backbone import Backbone, BackboneConfig, Passage
    from indexing import IndexHandle
    from indexing.encoder import EncodeConfig
    from indexing.ray_encoding import RayEncoding

log = logging.getLogger(__name__)


@dataclass
class Workspace:
    """What a run executes with: the backbone (per quantization), local scratch, a cache of index versions."""

    backbone_config: BackboneConfig
    work_dir: Path
    backbones: dict[str, Backbone] = field(default_factory=dict)  # loaded ones, by quantization
    ray_encoding: RayEncoding | None = None  # re-encode passages on Ray Data (None: in this host's processes)

    def encode(self, threads: int | None = None) -> EncodeConfig:
        """How the run's index builds encode: on Ray, or here with `threads` torch threads."""
        from indexing.encoder import EncodeConfig

        return EncodeConfig(progress=False, threads=threads, ray=self.ray_encoding)

    def backbone(self, quantize: str = "none") -> Backbone:
        """The backbone with its generator as `quantize` says ("4bit": QLoRA's frozen NF4 generator)."""
        if quantize not in self.backbones:
            from backbone import Backbone
            from backbone.quantization import quantize_generator_4bit

            self.backbones.clear()  # one copy of the weights at a time
            backbone = Backbone.load(self.backbone_config)
            if quantize == "4bit":
                quantize_generator_4bit(backbone)
            self.backbones[quantize] = backbone
        return self.backbones[quantize]


def execute(ctx: RunContext, workspace: Workspace) -> RunRecord:
    """Execute (or resume) a claimed run to its end, and settle its end state whatever happens: succeeded,
    failed or cancelled, or back in the queue when the worker stops (it resumes from its last checkpoint).

    A store outage is not the run's fault: the run goes back to the queue once the store answers again and
    resumes from its last checkpoint. Its end state is written when the store lets it through."""
    runs, run_id = ctx.runs, ctx.id
    try:
        phases = _Phases(ctx, workspace)
        try:
            return phases.through()
        finally:
            phases.detach()
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
            lambda: finish(ctx, RunState.CANCELLED),
            ctx.should_stop,
            f"recording that run {run_id} was cancelled",
        )
        raise
    except KeyboardInterrupt:  # Ctrl-C on `ragadapt adapt`: the person stopped it
        finish(ctx, RunState.CANCELLED, error="interrupted from the keyboard")
        raise
    except Exception as exc:
        log.exception("run %s failed", run_id)
        code, error = getattr(exc, "code", None) or "run_failed", f"{type(exc).__name__}: {exc}"
        _when_store_answers(
            lambda: finish(ctx, RunState.FAILED, code=code, error=error),
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


@dataclass(frozen=True)
class _Trained:
    """What training hands on to indexing: the passages it searched and where it ended."""

    passages: list[Passage]
    step: int
    start_version: str  # the domain index version training started from


class _Phases:
    """The phases of one run, in order. Each records its outcome in run.json before the next starts, so a
    resumed run skips what is done: base metrics, training (from the last checkpoint), the new index, final
    metrics, the adapter version, promotion. What a phase reads of the run it reads from `ctx.record`, the
    one copy of the record this worker holds."""

    def __init__(self, ctx: RunContext, workspace: Workspace):
        from indexing.versions import IndexVersions

        self.ctx = ctx
        self.workspace = workspace
        self.request = ctx.record.request
        self.hp = self.request.hyperparameters
        self.store = ctx.runs.store
        self.bb = workspace.backbone(self.hp.quantize_generator)
        self.run_dir = workspace.work_dir / "runs" / ctx.id
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.domains = DomainRegistry(self.store)
        self.versions = IndexVersions(self.domains, workspace.work_dir / "index-cache")
        self.adapters = AdapterRegistry(self.store)
        self.trainee = f"run-{ctx.id}"  # the adapter set this run trains (a version once published)
        self.attached: list[str] = []
        dev = ctx.runs.get_input(ctx.id, "eval.jsonl")
        self.dev = parse_qa_jsonl(dev) if dev else []
        ctx.on_checkpoint = self._publish_checkpoint

    @property
    def record(self) -> RunRecord:
        return self.ctx.record

    @property
    def domain(self) -> str:
        return self.record.domain

    def through(self) -> RunRecord:
        """Every phase the run has not done yet, then its end."""
        if self.record.adapter_version is None:
            if self.dev and self.record.metrics.get("base") is None:
                self.evaluate_base()
            trained = self.train()
            index_version = self.record.index_version or self.index(trained)
            if self.dev and self.record.metrics.get("final") is None:
                self.evaluate_final(index_version)
            self.publish(index_version)
        return self.succeed()

    def detach(self) -> None:
        """Take the run's adapter sets off the backbone, which outlives the run in its worker."""
        for name in self.attached:
            if name in self.bb.adapter_sets:
                self.bb.remove_adapter_set(name)

    # --- phases ---------------------------------------------------------------------------------------------

    def evaluate_base(self) -> None:
        """What serves now: the parent adapter version over its index, or the base backbone."""
        from indexing.publish import base_index_version

        parent = self.record.parent
        if parent is not None:
            name = self._attach(self.adapters.ref(self.domain, parent))
            base = self._evaluate(name, self._open_index(self._parent_index()), parent, "base")
            self.bb.remove_adapter_set(name)
            self.attached.remove(name)
        else:
            version = base_index_version(
                self.bb, self.versions, self.domain, work_dir=self.run_dir, encode=self.workspace.encode()
            )
            base = self._evaluate(None, self._open_index(version), None, "base")
        self.ctx.update(metrics={**self.record.metrics, "base": base})

    def train(self) -> _Trained:
        """Attach the adapter set (from the last checkpoint, the parent, or zero LoRA) and train it."""
        from adapters.training import IndexRefresher, Trainer, TrainerState

        resume = self._attach_trainee()
        start_version, handle, index_dir = self._start_index(resume)
        data = self._training_data(handle, resume)
        self.ctx.update(started_at=self.record.started_at or now())
        self.ctx.stage("training", resume.state.step if resume else 0, data.total_steps)
        refresher = (
            IndexRefresher(self.domain, self.bb, self.versions, self.run_dir, encode=self.workspace.encode)
            if self.request.refresh_every
            else None
        )
        trainer = Trainer(
            self.bb,
            self.trainee,
            self.request,
            data.total_steps,
            data.train,
            data.sentences,
            handle,
            index_dir,
            self.ctx,
            refresher=refresher,
            work_dir=self.run_dir,
            resume=resume,
            state=TrainerState(
                index={"kind": "domain", "version": start_version, "start_version": start_version}
            ),
            generated=data.generated,
            pairs=data.pairs,
        )
        trainer.train()
        self.ctx.flush()
        return _Trained(list(trainer.index.passages), trainer.state.step, start_version)

    def index(self, trained: _Trained) -> str:
        """The index of the new passage encoder, published as a domain index version (nothing goes live); a
        run that kept the passage encoder frozen serves from the index it started with."""
        from indexing.publish import build_domain_index

        if "passage" in self.request.components:
            self.ctx.stage("indexing")
            start = self.versions.build_info(self.domain, trained.start_version)
            version = build_domain_index(
                self.bb,
                self.trainee,
                trained.passages,
                self.versions,
                self.domain,
                passages_version=start.passages_version,
                config=start.config,
                work_dir=self.run_dir,
                on_progress=lambda _stage, done, total: self.ctx.progress(done, total),
                encode=self.workspace.encode(),
            )
            self.ctx.event("rebuild", state="published", index_version=version, step=trained.step)
        else:
            version = trained.start_version
        self.ctx.update(index_version=version)
        return version

    def evaluate_final(self, index_version: str) -> None:
        """The trained adapter set over the run's index, and its paired difference to the base report."""
        final = self._evaluate(self.trainee, self._open_index(index_version), None, "final")
        self.ctx.update(
            metrics={**self.record.metrics, "final": final, "improvement": self._improvement(final)}
        )

    def publish(self, index_version: str) -> None:
        """The trained adapter set as a new adapter version of the domain (nothing goes live)."""
        self.ctx.stage("publishing")
        target = self.run_dir / "final"
        shutil.rmtree(target, ignore_errors=True)
        self.bb.save_adapter_set(self.trainee, target)
        manifest = self.adapters.publish(
            self.domain,
            target,
            backbone_fingerprint=self.bb.fingerprint,
            run_id=self.ctx.id,
            metrics={**_without_outcomes(self.record.metrics), "mode": self.request.mode},
            parent=self.record.parent,
            index_version=index_version,
            lora=self.hp.lora,
        )
        self.ctx.update(adapter_version=manifest.version)

    def succeed(self) -> RunRecord:
        """Promote per policy, drop the checkpoints (the adapter version is out), then end the run
        succeeded."""
        promoted, reason = promote(self.domains, self.record)
        self.ctx.update(promoted=promoted, step=self.record.total_steps)
        self.ctx.runs.drop_artifacts(self.ctx.id)
        finish(
            self.ctx,
            RunState.SUCCEEDED,
            adapter_version=self.record.adapter_version,
            index_version=self.record.index_version,
            promoted=promoted,
            promotion=reason,
        )
        return self.record

    # --- training, step by step -----------------------------------------------------------------------------

    def _attach_trainee(self) -> Resume | None:
        """The adapter set to train, attached under `trainee`: the last checkpoint's (returned, to resume
        from), the parent version's (init=live), or a fresh one of the run's LoRA settings."""
        import torch

        from adapters.training import load_resume

        runs, hp = self.ctx.runs, self.hp
        checkpoint = runs.latest_checkpoint(self.ctx.id)
        if checkpoint is not None:
            target = self.run_dir / f"checkpoint-{checkpoint.version}"
            shutil.rmtree(target, ignore_errors=True)
            artifacts.download(self.store, runs.checkpoints_prefix(self.ctx.id), checkpoint.version, target)
            self.bb.load_adapter_set(self.trainee, target / "adapters")
            self.attached.append(self.trainee)
            resume = load_resume(target)
            self.ctx.event(
                "state",
                state="running",
                resumed_from=resume.state.step,
                checkpoint=checkpoint.version,
                index=resume.state.index.get("kind"),
            )
            return resume
        if self._warm:
            self._attach(self.adapters.ref(self.domain, self.record.parent), name=self.trainee)
        else:
            torch.manual_seed(hp.seed)  # LoRA A matrices start random: the run's seed decides them
            self.bb.add_adapter_set(self.trainee, hp.lora)
            self.attached.append(self.trainee)
        return None

    @property
    def _warm(self) -> bool:
        """Whether training starts from the parent version (else from zero LoRA)."""
        return self.record.parent is not None and self.hp.init == "live"

    def _start_index(self, resume: Resume | None) -> tuple[str, IndexHandle, Path | None]:
        """The index training searches first: the checkpoint's, the parent's, or one of the base encoder.
        Returns the domain index version the run started from, the handle, and the local directory of a
        run-private index (None for a domain index)."""
        from indexing import IndexHandle
        from indexing.publish import base_index_version

        if resume is not None:
            start_version = resume.state.index["start_version"]
        elif self._warm:
            start_version = self._parent_index()
        else:
            start_version = base_index_version(
                self.bb, self.versions, self.domain, work_dir=self.run_dir, encode=self.workspace.encode()
            )
        if resume is None or resume.state.index.get("kind") != "run":
            return start_version, self._open_index(start_version), None
        ref = resume.state.index
        index_dir = self.run_dir / f"index-{ref['version']}"
        if not index_dir.exists():
            artifacts.download(
                self.store, self.ctx.runs.indexes_prefix(self.ctx.id), ref["version"], index_dir
            )
        handle = IndexHandle.open(
            index_dir,
            domain=self.domain,
            version=f"run-{ref['build_id']}",
            embedding_dim=self.bb.embedding_dim,
            fingerprint=self.bb.fingerprint,
        )
        return start_version, handle, index_dir

    def _training_data(self, handle: IndexHandle, resume: Resume | None) -> _TrainingData:
        """The frozen QA examples, generated questions, reconstruction sentences and retrieval pairs; the
        joint phase is dropped when none of the first three is left."""
        from adapters.synthetic import ict_pairs, qa_pairs, reconstruction_sentences

        runs, hp = self.ctx.runs, self.hp
        sentences: list[str] = []
        if hp.reconstruction_ratio > 0:
            given = runs.get_input(self.ctx.id, "reconstruction.txt")
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

        train = parse_qa_jsonl(runs.get_input(self.ctx.id, "train.jsonl") or b"")
        passages = list(handle.passages)
        synthetic = self.request.train.synthetic
        generated = self._generated(passages, train) if synthetic and synthetic.generated else []
        pairs: list[RetrievalPair] = []
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
        total_steps = self.record.total_steps
        if not (train or generated or sentences) and hp.retriever_steps:
            # Generated questions were asked for and none passed the round trip: no joint phase to run.
            total_steps = hp.retriever_steps
            if self.record.total_steps != total_steps:
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
        return _TrainingData(train, generated, sentences, pairs, total_steps)

    def _generated(self, passages: list[Passage], train: list[QaExample]) -> list[QaExample]:
        """Generated questions about the passages: from the store's cache, else written now by the base
        generator (round-trip checked against the base index) and cached for the next run."""
        from adapters.synthetic import GenerationConfig, SyntheticCache, generate_questions
        from indexing.publish import base_index_version

        settings = self.request.train.synthetic.generated
        config = GenerationConfig(**settings.model_dump(), seed=self.hp.seed)
        cache = SyntheticCache(self.store)
        identity = cache.identity(passages, train, self.bb.fingerprint, config)
        found = cache.find(self.domain, identity)
        if found is None:
            self.ctx.stage("generating questions")
            base = self._open_index(
                base_index_version(
                    self.bb, self.versions, self.domain, work_dir=self.run_dir, encode=self.workspace.encode()
                )
            )
            found = generate_questions(
                self.bb, passages, train, base, config, tick=self.ctx.tick, progress=self.ctx.progress
            )
            cache.put(self.domain, identity, found)
            self.ctx.event("generated", passages=min(len(passages), config.max_passages), kept=len(found))
        return found

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
            run_id=self.ctx.id,
            metrics={"checkpoint": self.ctx.latest, "mode": self.request.mode},
            parent=self.record.parent,
            index_version=index["version"] if index.get("kind") == "domain" else index["start_version"],
            lora=self.hp.lora,
            checkpoint_step=step,
        )
        return manifest.version

    # --- helpers --------------------------------------------------------------------------------------------

    def _attach(self, ref: AdapterRef, name: str | None = None) -> str:
        """Attach an adapter version (under `name`, by default its own key) until the run ends."""
        name = self.adapters.attach(self.bb, ref, self.run_dir, name=name)
        self.attached.append(name)
        return name

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


@dataclass(frozen=True)
class _TrainingData:
    train: list[QaExample]  # the frozen training examples
    generated: list[QaExample]  # generated questions kept by the round trip
    sentences: list[str]  # reconstruction sentences
    pairs: list[RetrievalPair]  # the retriever phase's queries and positives
    total_steps: int


def _without_outcomes(metrics: dict) -> dict:
    """Run metrics without the reports' per-question outcomes (what an adapter version's manifest keeps)."""
    return {
        name: {k: v for k, v in value.items() if k != "per_question"}
        if name in ("base", "final") and value
        else value
        for name, value in metrics.items()
    }


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

"""The RAG End2End + LoRA trainer of one adaptation run.

One optimizer step, per micro-batch of `batch_size` rows (RAG End2End, Siriwardhana et al.):

1. encode each row's query with the LoRA question encoder (the question; for a reconstruction row, the
   sentence itself), keeping the graph when the question encoder trains;
2. retrieve the top-k passages for the detached embeddings from the current, slightly stale, index;
3. `Backbone.rag_loss` re-encodes those passages with the LoRA passage encoder (gradients flow through the
   doc scores) and marginalises the generator's likelihood of the target over them. A reconstruction row
   has no question (the control token stands in) and a domain sentence as its target.

Every `index_refresh_every` steps a snapshot of the adapter set is re-indexed by `indexing.RebuildJob` in a
background worker process (kept private to the run: nothing is published, no pointer moves); the trainer
keeps stepping on the old index and switches when the new one is ready. Every `checkpoint_every` steps (and
when the run is interrupted) it hands a checkpoint directory to the run: adapter set, optimizer and
scheduler state, RNG state and the trainer's own position, enough to resume the same run exactly where it
stopped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch

from adapters.errors import InvalidRun, RunInterrupted
from adapters.qa import QaExample
from adapters.runs import RunRequest
from backbone import AdapterSetConfig, Backbone, BackboneConfig, LoraConfig, Passage
from indexing import IndexConfig, IndexHandle
from indexing.builder import build_index
from indexing.encoder import EncodeConfig
from indexing.rebuild import RebuildJob, RebuildSpec, RebuildState
from indexing.versions import IndexVersions
from storage import new_version_id

log = logging.getLogger(__name__)

# Mid-run indexes only serve training's own dense retrieval: exact search, no BM25 to build.
TRAINING_INDEX = IndexConfig(factory="Flat", retrieval="dense", bm25=False)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])")


@dataclass
class TrainerState:
    """Where training is; saved with every checkpoint."""

    step: int = 0
    qa_cursor: int = 0  # QA examples consumed so far (epoch = cursor // len(examples))
    index: dict = field(default_factory=dict)  # which index training searches: {"kind": "domain"|"run", ...}
    refreshes: int = 0  # index switches so far
    python_rng: list | None = None


class RunHooks(Protocol):
    """What the trainer needs from the run it belongs to (see `adapters.worker.RunContext`)."""

    def tick(self) -> None:
        """Between micro-batches: raises RunCancelled / RunInterrupted / LeaseLost when the run must stop."""

    def event(self, kind: str, **payload) -> None: ...

    def step(self, step: int, latest: dict[str, float]) -> None: ...

    def upload_index(self, directory: Path, build_id: str) -> str:
        """Store a run-private index a checkpoint refers to; returns the version it got."""

    def checkpoint(self, step: int, directory: Path, state: TrainerState) -> None:
        """Persist a complete checkpoint directory."""


@dataclass
class Resume:
    """A checkpoint, downloaded: the adapter set is already attached under the run's key."""

    state: TrainerState
    optimizer: dict
    rng: dict


@dataclass(frozen=True)
class Row:
    question: str | None  # None: a reconstruction row
    target: str
    query: str  # what the question encoder embeds for retrieval


def reconstruction_sentences(
    passages: list[Passage] | tuple[Passage, ...], *, min_words: int, max_words: int, limit: int, seed: int
) -> list[str]:
    """Domain sentences to reconstruct, cut from the passages (a deterministic sample of at most `limit`)."""
    sentences = []
    for passage in passages:
        for line in passage.text.splitlines():
            for sentence in _SENTENCE_END.split(line.strip()):
                words = sentence.split()
                if min_words <= len(words) <= max_words:
                    sentences.append(" ".join(words))
    sentences = sorted(set(sentences))
    if len(sentences) > limit:
        sentences = random.Random(seed).sample(sentences, limit)
    return sentences


def autocast(backbone: Backbone):
    """bf16 autocast on CUDA (the frozen weights may be fp32 there); on CPU the weights' dtype rules."""
    if backbone.device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def quantize_generator_4bit(backbone: Backbone) -> None:
    """QLoRA: replace the frozen generator's linear layers (not the LM head) by NF4 4-bit ones, in place.

    Only in a process that trains (a run worker's own backbone) and before any adapter is attached; LoRA
    then wraps the 4-bit layers (PEFT's bitsandbytes dispatch). The fingerprint is unchanged: adapters
    trained this way serve on the unquantized generator, as QLoRA adapters do.
    """
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise InvalidRun("quantize_generator='4bit' needs the bitsandbytes package") from exc
    if backbone.device.type != "cuda":
        raise InvalidRun("quantize_generator='4bit' needs the backbone on a CUDA device")
    host = backbone.generator.host
    if host.peft is not None:
        raise InvalidRun("the generator must be quantized before adapters are attached")
    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    swaps = [
        (parent, name, child)
        for parent in host.base.modules()
        for name, child in parent.named_children()
        if isinstance(child, torch.nn.Linear) and name != "lm_head"
    ]
    for parent, name, child in swaps:
        layer = bnb.nn.Linear4bit(
            child.in_features,
            child.out_features,
            bias=child.bias is not None,
            compute_dtype=compute,
            quant_type="nf4",
        )
        layer.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False, quant_type="nf4")
        if child.bias is not None:
            layer.bias = torch.nn.Parameter(child.bias.data.clone(), requires_grad=False)
        setattr(parent, name, layer.to(backbone.device))  # quantized on the move to the GPU
    log.info("generator quantized to NF4: %d linear layers", len(swaps))


class IndexRefresher:
    """Re-indexes the domain's passages with a snapshot of the adapter set in a background worker process.

    On a CPU the trainer and the rebuild share this process's cores: while a rebuild runs, each gets its own
    part of them. Two processes both using every core make OpenMP threads wait on one another, and both slow
    down many times over rather than by half."""

    def __init__(self, domain: str, backbone: Backbone, versions: IndexVersions, work_dir: Path):
        self.domain = domain
        self.backbone = backbone
        self.versions = versions
        self.work_dir = Path(work_dir)
        self.job: RebuildJob | None = None
        self.started_step: int | None = None
        self._snapshot: Path | None = None
        self._threads = torch.get_num_threads()  # the trainer's when no rebuild runs
        self._rebuild_threads = max(self._threads // 2, 1)

    @property
    def pending(self) -> bool:
        return self.job is not None

    def start(self, step: int, key: str) -> None:
        snapshot = self.work_dir / "snapshots" / f"step-{step:08d}"
        shutil.rmtree(snapshot, ignore_errors=True)
        self.backbone.save_adapter_set(key, snapshot)
        spec = RebuildSpec(
            domain=self.domain,
            backbone=self.backbone.config,
            adapter_dir=snapshot,
            index=TRAINING_INDEX,
            encode=EncodeConfig(progress=False, threads=self._rebuild_threads),
            flip=False,
            publish=False,
        )
        self.job = RebuildJob(spec, self.versions, self.work_dir / "rebuilds").start()
        self.started_step, self._snapshot = step, snapshot
        torch.set_num_threads(max(self._threads - self._rebuild_threads, 1))

    def poll(self) -> tuple[str, Path | None, str | None] | None:
        """None while running; then ("succeeded", index directory, build id) or ("failed", None, why)."""
        job = self.job
        if job is None or not job.status.finished:
            return None
        self._forget_snapshot()
        self.job = None
        torch.set_num_threads(self._threads)
        if job.status is not RebuildState.SUCCEEDED:
            return "failed", None, job.error
        result = job.result(timeout=0)
        target = self.work_dir / "indexes" / job.build_id
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(result.directory), target)
        shutil.rmtree(result.directory.parent, ignore_errors=True)  # the job's scratch directory
        return "succeeded", target, job.build_id

    def cancel(self, wait_s: float = 30.0) -> None:
        if self.job is not None:
            self.job.cancel()
            self.job.wait(wait_s)
            self.job = None
            torch.set_num_threads(self._threads)
        self._forget_snapshot()

    def _forget_snapshot(self) -> None:
        if self._snapshot is not None:
            shutil.rmtree(self._snapshot, ignore_errors=True)
            self._snapshot = None


class Trainer:
    """Trains adapter set `key` of `backbone` as `request` says, from `state` (fresh or resumed)."""

    def __init__(
        self,
        backbone: Backbone,
        key: str,
        request: RunRequest,
        total_steps: int,
        examples: list[QaExample],
        sentences: list[str],
        index: IndexHandle,
        index_dir: Path | None,
        hooks: RunHooks,
        *,
        refresher: IndexRefresher | None,
        work_dir: Path,
        resume: Resume | None = None,
        state: TrainerState | None = None,
    ):
        if not examples:
            raise InvalidRun("no training examples")
        self.backbone = backbone
        self.key = key
        self.request = request
        self.hp = request.hyperparameters
        self.total_steps = total_steps
        self.examples = examples
        self.sentences = sentences
        self.index = index
        self.index_dir = index_dir  # local directory of a run-private index (None: a published domain index)
        self.hooks = hooks
        self.refresher = refresher
        self.work_dir = Path(work_dir)
        self.resume = resume
        self.state = resume.state if resume is not None else (state or TrainerState())
        self._permutations: dict[int, list[int]] = {}
        self._checkpointed = self.state.step if resume is not None else -1

    # --- the loop -------------------------------------------------------------------------------------------

    def train(self) -> TrainerState:
        hp, bb = self.hp, self.backbone
        components = self.request.components
        with bb.training(self.key, components, checkpointing=hp.activation_checkpointing) as params:
            optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._schedule)
            if self.resume is not None:
                optimizer.load_state_dict(self.resume.optimizer["optimizer"])
                scheduler.load_state_dict(self.resume.optimizer["scheduler"])
                _set_rng(self.resume.rng, self.state)
            else:
                torch.manual_seed(hp.seed)
                random.seed(hp.seed)
            try:
                while self.state.step < self.total_steps:
                    self._step(params, optimizer, scheduler)
            except RunInterrupted:
                # Parameters and optimizer are as the last completed step left them: save that much.
                if self.state.step > self._checkpointed:
                    self._checkpoint(optimizer, scheduler)
                raise
            finally:
                if self.refresher is not None:
                    self.refresher.cancel()
        return self.state

    def _step(self, params, optimizer, scheduler) -> None:
        hp = self.hp
        step = self.state.step + 1
        started = time.perf_counter()
        losses, rows = [], 0
        for micro in range(hp.grad_accumulation):
            self.hooks.tick()
            batch = self._rows(step, micro)
            loss = self._loss(batch)
            (loss / hp.grad_accumulation).backward()
            losses.append(loss.item())
            rows += len(batch)
        if hp.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        self.state.step = step
        elapsed = time.perf_counter() - started
        self._poll_refresh(step)
        self._bound_staleness(step)
        self.hooks.step(
            step,
            {
                "loss": round(sum(losses) / len(losses), 5),
                "lr": scheduler.get_last_lr()[0],
                "examples_per_s": round(rows / elapsed, 3) if elapsed > 0 else 0.0,
            },
        )
        every = self.request.refresh_every
        if (
            self.refresher is not None
            and every
            and step % every == 0
            and step < self.total_steps
            and not self.refresher.pending
        ):
            self.refresher.start(step, self.key)
            self.hooks.event("rebuild", state="started", step=step)
        if step % hp.checkpoint_every == 0 or step == self.total_steps:
            self._checkpoint(optimizer, scheduler)

    def _loss(self, rows: list[Row]) -> torch.Tensor:
        bb, hp = self.backbone, self.hp
        with autocast(bb):
            # One question-encoder pass serves both retrieval (detached) and the doc scores (with gradients).
            queries = bb.encode_questions([r.query for r in rows], self.key)  # [n, dim]
            hits = self.index.search(queries.detach(), k=hp.top_k, mode="dense")
            passages = [[h.passage for h in row] for row in hits]  # [n][k]
            return bb.rag_loss(
                [r.question for r in rows],
                [r.target for r in rows],
                passages,
                self.key,
                kind=hp.loss,
                train=self.request.components,
                question_embeddings=queries,
            )

    def _schedule(self, step: int) -> float:
        """Linear warm-up over `warmup_steps`, then linear decay to zero at the last step."""
        warmup = self.hp.warmup_steps
        if step < warmup:
            return (step + 1) / warmup
        remaining = self.total_steps - step
        return max(remaining, 0) / max(self.total_steps - warmup, 1)

    # --- data -----------------------------------------------------------------------------------------------

    def _rows(self, step: int, micro: int) -> list[Row]:
        """The micro-batch of a step: a function of (seed, step, micro) and the QA cursor, so a resumed run
        sees the very rows it would have seen."""
        rng = random.Random(f"{self.hp.seed}:{step}:{micro}")
        rows = []
        for _ in range(self.hp.batch_size):
            if self.sentences and rng.random() < self.hp.reconstruction_ratio:
                sentence = rng.choice(self.sentences)
                rows.append(Row(None, sentence, sentence))
            else:
                example = self._next_example()
                rows.append(Row(example.question, rng.choice(example.answers), example.question))
        return rows

    def _next_example(self) -> QaExample:
        n = len(self.examples)
        epoch, position = divmod(self.state.qa_cursor, n)
        order = self._permutations.get(epoch)
        if order is None:
            order = list(range(n))
            random.Random(f"{self.hp.seed}:epoch:{epoch}").shuffle(order)
            self._permutations = {epoch: order}
        self.state.qa_cursor += 1
        return self.examples[order[position]]

    # --- index refresh --------------------------------------------------------------------------------------

    def _bound_staleness(self, step: int) -> None:
        """Wait for a pending refresh that is `max_index_staleness` steps old; cancel stays prompt."""
        bound = self.hp.max_index_staleness
        refresher = self.refresher
        if bound is None or refresher is None or not refresher.pending:
            return
        if step - refresher.started_step < bound:
            return
        log.info("index refresh started at step %s is %s steps old: waiting for it", refresher.started_step, bound)
        while refresher.pending:
            self.hooks.tick()
            refresher.job.wait(0.2)
            self._poll_refresh(step)

    def _poll_refresh(self, step: int) -> None:
        if self.refresher is None:
            return
        started = self.refresher.started_step
        outcome = self.refresher.poll()
        if outcome is None:
            return
        status, directory, detail = outcome
        if status == "failed":
            log.warning("index refresh started at step %s failed: %s", started, detail)
            self.hooks.event("rebuild", state="failed", step=step, started_step=started, error=detail)
            return
        bb = self.backbone
        handle = IndexHandle.open(
            directory,
            domain=self.index.domain,
            version=f"run-{detail}",
            embedding_dim=bb.embedding_dim,
            fingerprint=bb.fingerprint,
        )
        previous = self.index_dir
        self.index, self.index_dir = handle, directory
        self.state.index = {
            "kind": "run",
            "build_id": detail,
            "step": started,
            "version": None,
            "start_version": self.state.index.get("start_version"),
        }
        self.state.refreshes += 1
        self.hooks.event(
            "rebuild",
            state="switched",
            step=step,
            started_step=started,
            build_id=detail,
            passages=handle.size,
        )
        if previous is not None and previous != directory:
            shutil.rmtree(previous, ignore_errors=True)

    # --- checkpoints ----------------------------------------------------------------------------------------

    def _checkpoint(self, optimizer, scheduler) -> None:
        step = self.state.step
        directory = self.work_dir / "checkpoint"
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        self.backbone.save_adapter_set(self.key, directory / "adapters")
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
            directory / "optimizer.pt",
        )
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, directory / "rng.pt")
        self.state.python_rng = _jsonable(random.getstate())
        if self.state.index.get("kind") == "run" and self.state.index.get("version") is None:
            self.state.index["version"] = self.hooks.upload_index(
                self.index_dir, self.state.index["build_id"]
            )
        (directory / "state.json").write_text(json.dumps(asdict(self.state)))
        self.hooks.checkpoint(step, directory, self.state)
        self._checkpointed = step
        shutil.rmtree(directory, ignore_errors=True)


def load_resume(directory: Path) -> Resume:
    """Read a downloaded checkpoint directory (its adapters/ are attached by the caller)."""
    directory = Path(directory)
    state = TrainerState(**json.loads((directory / "state.json").read_text()))
    optimizer = torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True)
    rng = torch.load(directory / "rng.pt", map_location="cpu", weights_only=True)
    return Resume(state, optimizer, rng)


def _set_rng(rng: dict, state: TrainerState) -> None:
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if state.python_rng is not None:
        version, internal, gauss = state.python_rng
        random.setstate((version, tuple(internal), gauss))


def _jsonable(value):
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def build_domain_index(
    backbone: Backbone,
    key: str | None,
    passages: list[Passage],
    versions: IndexVersions,
    domain: str,
    *,
    passages_version: str | None,
    config: IndexConfig,
    work_dir: Path,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> str:
    """Encode `passages` with the passage encoder of adapter set `key` (None: base), build the index with
    the domain's settings and publish it as a new index version (no pointer moves); returns the version."""
    directory = Path(work_dir) / f"index-{new_version_id()}"
    try:
        build_index(
            backbone,
            passages,
            directory,
            build_id=directory.name.removeprefix("index-"),
            adapter=key,
            passages_version=passages_version,
            config=config,
            encode=EncodeConfig(progress=False),
            work_dir=Path(work_dir) / "shards",
            on_progress=on_progress,
        )
        return versions.publish_index(domain, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def base_index_version(
    backbone: Backbone,
    versions: IndexVersions,
    domain: str,
    *,
    work_dir: Path,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> str:
    """A published index of the domain's live passages encoded by the base passage encoder (no LoRA), for
    runs that start from zero LoRA and for evaluating the base backbone: the live one if it is, else an
    earlier matching version, else one built and published now."""
    live = versions.live(domain).index_version
    if live is None:
        raise InvalidRun(f"domain {domain!r} has no index yet")
    live_info = versions.build_info(domain, live)
    if live_info.passage_adapter == "base" and live_info.encoder_fingerprint == backbone.fingerprint:
        return live
    for version in reversed(versions.versions(domain)):
        info = versions.build_info(domain, version)
        if (
            info.passage_adapter == "base"
            and info.encoder_fingerprint == backbone.fingerprint
            and info.passages_checksum == live_info.passages_checksum
        ):
            return version
    handle = IndexHandle.open(versions.fetch(domain, live), domain=domain, version=live)
    return build_domain_index(
        backbone,
        None,
        list(handle.passages),
        versions,
        domain,
        passages_version=live_info.passages_version,
        config=live_info.config,
        work_dir=work_dir,
        on_progress=on_progress,
    )


def adapter_set_config(lora) -> AdapterSetConfig:
    """The backbone's AdapterSetConfig for a run's `LoraSettings`."""
    return AdapterSetConfig(
        **{
            component: LoraConfig(
                r=spec.r,
                alpha=spec.alpha,
                dropout=spec.dropout,
                targets=tuple(spec.targets) if spec.targets else None,
            )
            for component, spec in (
                ("question", lora.question),
                ("passage", lora.passage),
                ("generator", lora.generator),
            )
        }
    )


def backbone_for(config: BackboneConfig, quantize: str) -> Backbone:
    backbone = Backbone.load(config)
    if quantize == "4bit":
        quantize_generator_4bit(backbone)
    return backbone

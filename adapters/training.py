"""The RAG End2End + LoRA trainer of one adaptation run, in two phases.

The retriever phase (steps 1..`retriever_steps`) trains the encoders alone with the supervised contrastive
loss (DPR's InfoNCE): each query against its positive passage, the other rows' passages and hard negatives
mined from the current, slightly stale, index (dense and BM25 top 10 minus the gold passages). Its queries
are real questions with gold passages, generated questions and inverse-cloze sentences of every passage
(`adapters.synthetic`): the marginal RAG loss alone reaches the retriever only through passages it already
ranks in its top k, which on little data is a weak signal. The phase ends with an index refresh the trainer
waits for, so the joint phase retrieves with what the retriever learned.

The joint phase is RAG End2End (Siriwardhana et al.). Per micro-batch of `batch_size` rows:

1. encode each row's query with the LoRA question encoder (the question; for a reconstruction row, the
   sentence itself), keeping the graph when the question encoder trains;
2. retrieve the top-k passages for the detached embeddings from the current index; with probability
   `gold_passage_prob` a row's gold passage is put among them (RAFT), so the generator learns to answer from
   the right passage among distractors and, the rest of the time, with retrieval as it is;
3. re-encode those passages with the LoRA passage encoder (gradients flow through the doc scores) and take the
   weighted sum of the marginal likelihood of the target over them (`marginal_weight`; RAG End2End as
   published when it is the only weight), the contrastive loss of rows with gold passages
   (`contrastive_weight`) and LM-supervised retrieval for rows without (`lm_supervision_weight`: REPLUG's KL
   between the retriever's distribution over the k and the generator's normalised likelihood of the answer).
   A reconstruction row has no question (the control token stands in) and a domain sentence as its target.

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
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from adapters.errors import InvalidRun, RunInterrupted
from adapters.qa import QaExample
from adapters.spec import RunRequest
from adapters.synthetic import RetrievalPair
from backbone import Backbone, Passage
from backbone.rag import info_nce, lm_supervised_kl, rag_sequence_nll, rag_token_nll
from indexing import IndexConfig, IndexHandle
from indexing.encoder import EncodeConfig
from indexing.lexical import Bm25Index
from indexing.rebuild import RebuildJob, RebuildSpec, RebuildState
from indexing.versions import IndexVersions

log = logging.getLogger(__name__)

# Mid-run indexes only serve training's own dense retrieval: exact search, no BM25 to build.
TRAINING_INDEX = IndexConfig(factory="Flat", retrieval="dense", bm25=False)


@dataclass
class TrainerState:
    """Where training is; saved with every checkpoint."""

    step: int = 0
    qa_cursor: int = 0  # QA examples consumed so far (epoch = cursor // len(examples))
    synthetic_cursor: int = 0  # generated questions consumed so far
    pair_cursor: int = 0  # retrieval pairs consumed so far (the retriever phase)
    joint: bool = False  # the index refresh ending the retriever phase has landed
    index: dict = field(default_factory=dict)  # which index training searches: {"kind": "domain"|"run", ...}
    refreshes: int = 0  # index switches so far
    python_rng: list | None = None


class RunHooks(Protocol):
    """What the trainer needs from the run it belongs to (see `adapters.lease.RunContext`)."""

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
    gold: tuple[str, ...] = ()  # ids of the passages that hold the answer, when known


def hard_negatives(
    ranked: list[str], gold: tuple[str, ...], count: int, rng: random.Random, depth: int = 10
) -> list[str]:
    """`count` ids drawn from the first `depth` of a ranking that are not gold: passages the retriever
    confuses with the answer's, never the answer's own."""
    candidates = [pid for pid in ranked if pid not in gold][:depth]
    return rng.sample(candidates, min(count, len(candidates)))


def _linear_schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then linear decay to zero at step `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return max(total - step, 0) / max(total - warmup, 1)


def autocast(backbone: Backbone):
    """bf16 autocast on CUDA (the frozen weights may be fp32 there); on CPU the weights' dtype rules."""
    if backbone.device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class IndexRefresher:
    """Re-indexes the domain's passages with a snapshot of the adapter set in a background worker process.

    On a CPU the trainer and the rebuild share this process's cores: while a rebuild runs, each gets its own
    part of them. Two processes both using every core make OpenMP threads wait on one another, and both slow
    down many times over rather than by half."""

    def __init__(
        self,
        domain: str,
        backbone: Backbone,
        versions: IndexVersions,
        work_dir: Path,
        encode: Callable[[int], EncodeConfig] = lambda threads: EncodeConfig(progress=False, threads=threads),
    ):
        """`encode(threads)`: how a rebuild given `threads` of this process's cores encodes."""
        self.domain = domain
        self.backbone = backbone
        self.versions = versions
        self.work_dir = Path(work_dir)
        self.job: RebuildJob | None = None
        self.started_step: int | None = None
        self._snapshot: Path | None = None
        self._threads = torch.get_num_threads()  # the trainer's when no rebuild runs
        self._rebuild_threads = max(self._threads // 2, 1)
        self._encode = encode

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
            encode=self._encode(self._rebuild_threads),
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
    """Trains adapter set `key` of `backbone` as `request` says, from `state` (fresh or resumed).

    Steps 1..`retriever_steps` are the retriever phase (the contrastive loss over `pairs`, encoders only); the
    rest are the joint phase (RAG End2End over QA rows from `examples` and `generated`, and reconstruction
    rows from `sentences`). Between the two the index is refreshed with the trained passage encoder, so the
    joint phase retrieves with what the retriever phase learned.
    """

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
        generated: list[QaExample] | None = None,
        pairs: list[RetrievalPair] | None = None,
    ):
        self.backbone = backbone
        self.key = key
        self.request = request
        self.hp = request.hyperparameters
        self.total_steps = total_steps
        self.retriever_steps = min(self.hp.retriever_steps or 0, total_steps)
        self.examples = examples
        self.generated = generated or []
        self.sentences = sentences
        self.pairs = pairs or []
        if self.retriever_steps and not self.pairs:
            raise InvalidRun(
                "the retriever phase has no retrieval pairs (no gold passages, no synthetic data)"
            )
        if total_steps > self.retriever_steps and not (self.examples or self.generated or self.sentences):
            raise InvalidRun("no training examples")
        synthetic = request.train.synthetic
        self.synthetic_ratio = synthetic.ratio if synthetic is not None else 0.0
        self.index = index
        self.index_dir = index_dir  # local directory of a run-private index (None: a published domain index)
        self.passages = {p.id: p for p in index.passages}
        self.hooks = hooks
        self.refresher = refresher
        self.work_dir = Path(work_dir)
        self.resume = resume
        self.state = resume.state if resume is not None else (state or TrainerState())
        self._permutations: dict[tuple[str, int], list[int]] = {}
        self._checkpointed = self.state.step if resume is not None else -1
        # The lexical half of hard-negative mining: the dense index changes with each refresh, BM25 never
        # does.
        self._bm25: Bm25Index | None = None
        self._bm25_ids = [p.id for p in index.passages]
        if self.retriever_steps > self.state.step and self.hp.hard_negatives:
            self._bm25 = Bm25Index.build(list(index.passages))

    # --- the loop -------------------------------------------------------------------------------------------

    def train(self) -> TrainerState:
        hp, bb = self.hp, self.backbone
        components = self.request.components
        with bb.training(self.key, components, checkpointing=hp.activation_checkpointing):
            trainable = bb.trainable_parameters(self.key)
            encoders = [p for c in ("question", "passage") if c in components for p in trainable[c]]
            generator = trainable["generator"] if "generator" in components else []
            groups = [
                {"params": params, "lr": lr, "name": name}
                for name, params, lr in (
                    ("encoders", encoders, hp.retriever_lr),
                    ("generator", generator, hp.lr),
                )
                if params
            ]
            optimizer = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer,
                [self._encoder_schedule if g["name"] == "encoders" else self._joint_schedule for g in groups],
            )
            params = encoders + generator
            if self.resume is not None:
                optimizer.load_state_dict(self.resume.optimizer["optimizer"])
                scheduler.load_state_dict(self.resume.optimizer["scheduler"])
                _set_rng(self.resume.rng, self.state)
            else:
                torch.manual_seed(hp.seed)
                random.seed(hp.seed)
            try:
                if 0 < self.retriever_steps <= self.state.step < self.total_steps and not self.state.joint:
                    self._end_retriever_phase(self.state.step)  # interrupted while waiting for it
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
        retrieving = step <= self.retriever_steps
        started = time.perf_counter()
        terms: dict[str, list[float]] = {}
        rows = 0
        for micro in range(hp.grad_accumulation):
            self.hooks.tick()
            if retrieving:
                pairs = [self._next_pair() for _ in range(hp.retriever_batch_size)]
                loss, parts = self._retriever_loss(step, micro, pairs)
                rows += len(pairs)
            else:
                batch = self._rows(step, micro)
                loss, parts = self._joint_loss(step, micro, batch)
                rows += len(batch)
            if loss.requires_grad:  # a batch none of whose rows any weighted term applies to trains nothing
                (loss / hp.grad_accumulation).backward()
            for name, value in {"loss": loss.item(), **parts}.items():
                terms.setdefault(name, []).append(value)
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
                **{name: round(sum(values) / len(values), 5) for name, values in terms.items()},
                "lr": max(scheduler.get_last_lr()),
                "examples_per_s": round(rows / elapsed, 3) if elapsed > 0 else 0.0,
            },
        )
        if step == self.retriever_steps < self.total_steps:
            self._end_retriever_phase(step)
        else:
            every = self.request.refresh_every
            if (
                self.refresher is not None
                and every
                and step % every == 0
                and step < self.total_steps
                and not self.refresher.pending
                and (not retrieving or hp.hard_negatives)  # without hard negatives, nothing searches it yet
            ):
                self.refresher.start(step, self.key)
                self.hooks.event("rebuild", state="started", step=step)
        if step % hp.checkpoint_every == 0 or step == self.total_steps:
            self._checkpoint(optimizer, scheduler)

    def _end_retriever_phase(self, step: int) -> None:
        """Re-index with the passage encoder the retriever phase trained and wait for it: the joint phase
        retrieves from what it learned. Without a trained passage encoder the index is still valid."""
        if self.refresher is not None:
            if self.refresher.pending:
                self.refresher.cancel()  # it encodes an older snapshot
            self.refresher.start(step, self.key)
            self.hooks.event("rebuild", state="started", step=step)
            while self.refresher.pending:
                self.hooks.tick()
                self.refresher.job.wait(0.2)
                self._poll_refresh(step)
        self.state.joint = True
        self.hooks.event("phase", name="joint", step=step)

    # --- losses ---------------------------------------------------------------------------------------------

    def _retriever_loss(self, step: int, micro: int, pairs: list[RetrievalPair]):
        """InfoNCE of each query against its positive, the other rows' passages and hard negatives mined from
        the current (stale) index: dense and BM25 top 10 minus the query's gold passages."""
        bb, hp = self.backbone, self.hp
        rng = random.Random(f"{hp.seed}:negatives:{step}:{micro}")
        with autocast(bb):
            queries = bb.encode_questions([p.query for p in pairs], self.key)  # [n, dim]
            passages = {p.positive.id: p.positive for p in pairs}
            if hp.hard_negatives:
                dense = self.index.search(
                    queries.detach(), k=10 + max(len(p.gold) for p in pairs), mode="dense"
                )
                for pair, hits in zip(pairs, dense):
                    ranked = [[h.passage.id for h in hits]]
                    if self._bm25 is not None:
                        found, _ = self._bm25.top_k(pair.query, 10 + len(pair.gold))
                        ranked.append([self._bm25_ids[i] for i in found])
                    for ids in ranked:
                        for pid in hard_negatives(ids, pair.gold, hp.hard_negatives, rng):
                            passages.setdefault(pid, self.passages[pid])
            ordered = list(passages.values())
            embeddings = self._encode_passages(ordered)  # [m, dim]
            positives = torch.tensor([[p.id in pair.gold for p in ordered] for pair in pairs])  # [n, m]
            loss = info_nce(queries, embeddings, positives, hp.temperature)
        return loss, {"contrastive": loss.item()}

    def _joint_loss(self, step: int, micro: int, rows: list[Row]):
        """RAG End2End's marginal loss, plus the contrastive loss on rows with gold passages and LM-supervised
        retrieval on rows without, weighted as the hyperparameters say."""
        bb, hp = self.backbone, self.hp
        components = self.request.components
        encoders_train = bool({"question", "passage"} & set(components))
        rng = random.Random(f"{hp.seed}:gold:{step}:{micro}")
        with autocast(bb), torch.set_grad_enabled(encoders_train):
            # One question-encoder pass serves both retrieval (detached) and the doc scores (with gradients).
            queries = bb.encode_questions([r.query for r in rows], self.key)  # [n, dim]
            hits = self.index.search(queries.detach(), k=hp.top_k, mode="dense")
            retrieved = [self._with_gold(r, [h.passage for h in row], rng) for r, row in zip(rows, hits)]
            unique = {p.id: p for row in retrieved for p in row}
            contrast = hp.contrastive_weight > 0 and encoders_train
            for row in rows:
                if contrast and row.gold:
                    unique.setdefault(row.gold[0], self.passages[row.gold[0]])
            ordered = list(unique.values())
            position = {p.id: i for i, p in enumerate(ordered)}
            embeddings = self._encode_passages(ordered)  # [m, dim]
            rows_of = torch.tensor([[position[p.id] for p in row] for row in retrieved])  # [n, k]
            documents = embeddings[rows_of]  # [n, k, dim]
            scores = torch.einsum("nd,nkd->nk", queries, documents) * bb.score_scale
            doc_logprobs = torch.log_softmax(scores, dim=-1)  # [n, k]
        with autocast(bb), torch.set_grad_enabled("generator" in components):
            token_logprobs, mask = bb.answer_logprobs(
                [r.question for r in rows], [r.target for r in rows], retrieved, self.key
            )  # [n, k, T]
        parts: dict[str, float] = {}
        loss = doc_logprobs.new_zeros(())
        if hp.marginal_weight:
            if hp.loss == "token":
                marginal = rag_token_nll(doc_logprobs, token_logprobs, mask[:, 0])
            else:
                marginal = rag_sequence_nll(doc_logprobs, token_logprobs)
            loss = loss + hp.marginal_weight * marginal
            parts["marginal"] = marginal.item()
        gold_rows = [i for i, r in enumerate(rows) if r.gold]
        if contrast and gold_rows:
            positives = torch.tensor([[p.id in rows[i].gold for p in ordered] for i in gold_rows])  # [g, m]
            contrastive = info_nce(queries[gold_rows], embeddings, positives, hp.temperature)
            loss = loss + hp.contrastive_weight * contrastive
            parts["contrastive"] = contrastive.item()
        other_rows = [i for i, r in enumerate(rows) if not r.gold]
        if hp.lm_supervision_weight and encoders_train and other_rows:
            supervision = lm_supervised_kl(
                doc_logprobs[other_rows], token_logprobs[other_rows].sum(-1), hp.lm_supervision_temperature
            )
            loss = loss + hp.lm_supervision_weight * supervision
            parts["lm_supervision"] = supervision.item()
        return loss, parts

    def _with_gold(self, row: Row, passages: list[Passage], rng: random.Random) -> list[Passage]:
        """RAFT: with probability `gold_passage_prob` a row with gold passages has one among its k (in place
        of the last retrieved one when retrieval missed them all); otherwise it keeps what retrieval found."""
        if not row.gold or rng.random() >= self.hp.gold_passage_prob:
            return passages
        if any(p.id in row.gold for p in passages):
            return passages
        return [*passages[:-1], self.passages[rng.choice(row.gold)]]

    def _encode_passages(self, passages: list[Passage]) -> torch.Tensor:
        if "passage" in self.request.components:
            return self.backbone.encode_passages(passages, self.key)
        with torch.no_grad():
            return self.backbone.encode_passages(passages, self.key)

    def _encoder_schedule(self, step: int) -> float:
        """The encoders' rate (base `retriever_lr`): the retriever phase's schedule, then the joint one at
        `lr`."""
        if step < self.retriever_steps:
            return _linear_schedule(step, self.retriever_steps, self.hp.warmup_steps)
        return self.hp.lr / self.hp.retriever_lr * self._joint_schedule(step)

    def _joint_schedule(self, step: int) -> float:
        """Zero in the retriever phase, then linear warm-up and decay over the joint phase."""
        if step < self.retriever_steps:
            return 0.0
        return _linear_schedule(
            step - self.retriever_steps, self.total_steps - self.retriever_steps, self.hp.warmup_steps
        )

    # --- data -----------------------------------------------------------------------------------------------

    def _rows(self, step: int, micro: int) -> list[Row]:
        """The micro-batch of a step: a function of (seed, step, micro) and the cursors, so a resumed run
        sees the very rows it would have seen."""
        rng = random.Random(f"{self.hp.seed}:{step}:{micro}")
        rows = []
        for _ in range(self.hp.batch_size):
            if self.sentences and (
                rng.random() < self.hp.reconstruction_ratio or not (self.examples or self.generated)
            ):
                sentence = rng.choice(self.sentences)
                rows.append(Row(None, sentence, sentence))
            else:
                example = self._next_example(rng)
                rows.append(
                    Row(
                        example.question,
                        rng.choice(example.answers),
                        example.question,
                        tuple(p for p in example.passage_ids if p in self.passages),
                    )
                )
        return rows

    def _next_example(self, rng: random.Random) -> QaExample:
        synthetic = self.generated and (not self.examples or rng.random() < self.synthetic_ratio)
        if synthetic:
            return self.generated[self._advance("generated", "synthetic_cursor", len(self.generated))]
        return self.examples[self._advance("qa", "qa_cursor", len(self.examples))]

    def _next_pair(self) -> RetrievalPair:
        return self.pairs[self._advance("pairs", "pair_cursor", len(self.pairs))]

    def _advance(self, pool: str, cursor: str, n: int) -> int:
        """The next index into a pool, walking a seeded permutation per epoch; moves the state's cursor."""
        epoch, position = divmod(getattr(self.state, cursor), n)
        order = self._permutations.get((pool, epoch))
        if order is None:
            order = list(range(n))
            random.Random(f"{self.hp.seed}:{pool}:epoch:{epoch}").shuffle(order)
            self._permutations = {k: v for k, v in self._permutations.items() if k[0] != pool}
            self._permutations[(pool, epoch)] = order
        setattr(self.state, cursor, getattr(self.state, cursor) + 1)
        return order[position]

    # --- index refresh --------------------------------------------------------------------------------------

    def _bound_staleness(self, step: int) -> None:
        """Wait for a pending refresh that is `max_index_staleness` steps old; cancel stays prompt."""
        bound = self.hp.max_index_staleness
        refresher = self.refresher
        if bound is None or refresher is None or not refresher.pending:
            return
        if step - refresher.started_step < bound:
            return
        log.info(
            "index refresh started at step %s is %s steps old: waiting for it", refresher.started_step, bound
        )
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
            encoded_on=handle.info.encoded_on,
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

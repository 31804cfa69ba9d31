"""The model worker: one thread owns the backbone and answers questions across domains, continuously
batched.

Requests wait in a bounded queue (full: `Overloaded`, 503). Questions of any mix of domains are in flight
together, each under its own adapter set (heterogeneous batching as in LoRAX, S-LoRA and Punica, instead of
swapping one adapter per request), and the worker schedules per step, as Orca does:

1. between steps, queued questions join: one embed call (row i under row i's question-encoder LoRA), one
   FAISS/BM25 search per (index version, top_k, mode) group, and one prefill of all their generator rows under
   their generator LoRAs. The generator weighs BM25 and fused hits by their dense dot products, as RAG's
   document posterior expects (one more FAISS search). A row whose (instruction + passage) prefix is in the
   passage KV cache under the same generator weights prefills only its question (`PrefixCache`);
2. one decoding step runs every question in flight in one forward;
3. a question is answered as soon as its own rows are done, and its place goes to the next in the queue.

At most `max_batch_rows` questions are in flight, naming at most `hot_slots` distinct adapter sets; the worker
attaches a set before its first question joins and never detaches a set while a question uses it. When idle it
waits up to `batch_wait_ms` after a first question so that a burst starts together. Torch never runs on the
event loop: the HTTP layer awaits an asyncio future the worker resolves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from adapters import AdapterRef
from backbone import Answer, Backbone, PrefixCache
from indexing import Hit, IndexHandle

from .adapter_cache import AdapterCache
from .errors import NotReady, Overloaded
from .metrics import Metrics

log = logging.getLogger(__name__)


@dataclass
class AskJob:
    """One admitted question, resolved to the adapter and index versions it will be answered with."""

    question: str
    domain: str
    adapter: AdapterRef | None  # None: the base backbone
    index: IndexHandle
    top_k: int
    max_new_tokens: int
    retrieval: str  # dense | bm25 | hybrid
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    admitted: float = field(default_factory=time.perf_counter)
    deadline: float = math.inf  # perf_counter time when its client stops waiting (gets 504)
    cancelled: bool = False  # the client gave up (timeout): skipped if queued, dropped if decoding
    done: bool = False  # answered (or failed) and its lease given back; worker thread only
    generating_since: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    hits: list[Hit] = field(default_factory=list)
    doc_scores: list[float] = field(default_factory=list)  # q.d of each hit, for the generator

    @property
    def key(self) -> str | None:
        return self.adapter.key if self.adapter is not None else None


@dataclass(frozen=True)
class AskResult:
    answer: Answer
    hits: list[Hit]
    timings: dict[str, float]
    answer_tokens: int


class ModelWorker:
    def __init__(
        self,
        backbone: Backbone,
        cache: AdapterCache,
        metrics: Metrics,
        *,
        queue_size: int,
        max_batch_rows: int,
        batch_wait_s: float,
        retry_after_s: int = 1,
        kv_cache_bytes: int = 0,
        prefill_chunk_tokens: int = 0,
    ):
        self._backbone = backbone
        self._cache = cache
        self._metrics = metrics
        # Passage prefixes' KV states, kept across answerings (a failed step starts a new answering only).
        self._prefixes = PrefixCache(kv_cache_bytes)
        self._reported: dict[str, int] = {}  # the prefix cache's and prefill's counts the metrics have seen
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.queue_size = queue_size
        self.max_batch_rows = max_batch_rows
        self.batch_wait_s = batch_wait_s
        self.retry_after_s = retry_after_s
        self._queue: deque[AskJob] = deque()
        self._cond = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._running = True
            self._thread = threading.Thread(target=self._run, name="model-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the questions in flight, refuse what is still queued, and end the thread."""
        with self._cond:
            self._running = False
            left = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in left:
            _deliver(job, NotReady("the server is shutting down"))
            self._release(job)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def depth(self) -> int:
        return len(self._queue)

    # --- admission (event loop) -----------------------------------------------------------------------------

    def submit(self, job: AskJob) -> None:
        """Queue a job, or raise `Overloaded` at once when the queue is full (the caller answers 503). A full
        queue first drops the jobs nobody waits for any more (their clients got 504 or are about to).

        Once queued, the job's adapter lease belongs to the worker, which releases it when the job is done."""
        with self._cond:
            if not self._running:
                raise NotReady("the model worker is not running")
            if len(self._queue) >= self.queue_size:
                self._drop_expired()
            if len(self._queue) >= self.queue_size:
                raise Overloaded(
                    f"{len(self._queue)} requests are already waiting; retry shortly",
                    retry_after=self.retry_after_s,
                )
            self._queue.append(job)
            self._metrics.queue_depth.set(len(self._queue))
            self._cond.notify()

    def _drop_expired(self) -> None:
        """Remove queued jobs whose client gave up or whose deadline passed (under the lock)."""
        now = time.perf_counter()
        expired = [job for job in self._queue if job.cancelled or job.deadline <= now]
        if not expired:
            return
        self._queue = deque(job for job in self._queue if not (job.cancelled or job.deadline <= now))
        self._metrics.queue_depth.set(len(self._queue))
        for job in expired:
            self._finish(job, TimeoutError("the client stopped waiting"))

    # --- the worker thread ----------------------------------------------------------------------------------

    def _run(self) -> None:
        answering = self._answering()
        in_flight: dict[int, AskJob] = {}  # answering ticket -> job
        while True:
            admitted = self._admit(in_flight)
            if admitted is None:
                return
            with torch.inference_mode():
                self._drop_abandoned(answering, in_flight)
                try:
                    if admitted:
                        self._start(answering, admitted, in_flight)
                except Exception as exc:  # the newcomers get a 500; the questions in flight go on
                    log.exception("starting %d questions failed", len(admitted))
                    for job in admitted:
                        self._finish(job, exc)
                try:
                    self._step(answering, in_flight)
                except Exception as exc:  # a failed step must never kill the worker; its requests get a 500
                    log.exception("model step with %d questions failed", len(in_flight))
                    for job in in_flight.values():
                        self._finish(job, exc)
                    in_flight.clear()
                    answering = self._answering()

    def _answering(self):
        return self._backbone.answering(self._prefixes, self.prefill_chunk_tokens)

    def _release(self, job: AskJob) -> None:
        """Give back the adapter lease the HTTP layer handed over with the job."""
        if job.adapter is not None:
            self._cache.release(job.adapter)

    def _finish(self, job: AskJob, outcome: AskResult | BaseException) -> None:
        """Answer (or fail) a job once and give back its lease."""
        if not job.done:
            job.done = True
            _deliver(job, outcome)
            self._release(job)

    def _admit(self, in_flight: dict[int, AskJob]) -> list[AskJob] | None:
        """Queued jobs that join the questions in flight; None once stopping with nothing left in flight.

        With nothing in flight it waits for a first job, then up to `batch_wait_s` for more. Otherwise it
        takes what is queued without waiting, up to `max_batch_rows` questions in flight naming at most
        `hot_slots` adapter sets. A job whose adapter set finds no free slot keeps its place at the head of
        the queue; until it gets in, only jobs on the base backbone pass it, so the sets in flight drain and
        it cannot starve."""
        with self._cond:
            if not in_flight:
                while not self._queue and self._running:
                    self._cond.wait()
                if not self._running:
                    return None
                deadline = time.monotonic() + self.batch_wait_s
                while len(self._queue) < self.max_batch_rows and self._running:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            adapters = {job.adapter for job in in_flight.values() if job.adapter is not None}
            admitted, passed, blocked = [], [], False
            while self._queue and len(in_flight) + len(admitted) < self.max_batch_rows:
                job = self._queue.popleft()
                if job.cancelled:
                    self._release(job)
                    continue
                if job.adapter is not None and (blocked or job.adapter not in adapters):
                    if blocked or len(adapters) >= self._cache.hot_slots:
                        blocked = True
                        passed.append(job)
                        continue
                    adapters.add(job.adapter)
                admitted.append(job)
            self._queue.extendleft(reversed(passed))
            self._metrics.queue_depth.set(len(self._queue))
            return admitted

    def _drop_abandoned(self, answering, in_flight: dict[int, AskJob]) -> None:
        """Stop decoding for requests whose clients gave up (timed out)."""
        abandoned = {ticket for ticket, job in in_flight.items() if job.cancelled}
        if abandoned:
            answering.drop(abandoned)
            for ticket in abandoned:
                self._finish(in_flight.pop(ticket), TimeoutError("the client stopped waiting"))

    def _start(self, answering, batch: list[AskJob], in_flight: dict[int, AskJob]) -> None:
        """Embed, search and prefill newly admitted jobs (one pass per stage); they decode with the rest."""
        started = time.perf_counter()
        for job in batch:
            job.timings["queue"] = started - job.admitted
        # The sets in flight stay attached: make_hot only evicts sets it is not given.
        self._cache.make_hot(job.adapter for job in [*in_flight.values(), *batch] if job.adapter is not None)

        # 1. embed: one call for every row (BM25 rows too: their generator still weighs passages by q.d)
        t = time.perf_counter()
        vectors = self._backbone.encode_questions([job.question for job in batch], [job.key for job in batch])
        embeddings = vectors.float().cpu().numpy()  # [n, dim]
        embed_seconds = time.perf_counter() - t
        for job in batch:
            job.timings["embed"] = embed_seconds

        # 2. search: one call per (index version, k, mode)
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(batch):
            groups.setdefault((id(job.index), job.top_k, job.retrieval), []).append(i)
        answerable = []
        for (_, k, mode), rows in groups.items():
            handle = batch[rows[0]].index
            t = time.perf_counter()
            try:
                results = handle.search(embeddings[rows], [batch[i].question for i in rows], k=k, mode=mode)
                doc_scores = (
                    [[hit.score for hit in hits] for hits in results]
                    if mode == "dense"
                    else _dense_scores(handle, embeddings[rows], results, k)
                )
            except Exception as exc:  # e.g. RetrievalModeUnavailable: fails these rows only
                for i in rows:
                    self._finish(batch[i], exc)
                continue
            seconds = time.perf_counter() - t
            for i, hits, scores in zip(rows, results, doc_scores):
                batch[i].hits = hits
                batch[i].doc_scores = scores
                batch[i].timings["search"] = seconds
                answerable.append(batch[i])

        # 3. generate: prefill every new row in one forward; decoding steps follow with the rows in flight
        now = time.perf_counter()
        for job in answerable:
            job.generating_since = now
        tickets = answering.add(
            [job.question for job in answerable],
            [[hit.passage for hit in job.hits] for job in answerable],
            [job.doc_scores for job in answerable],
            [job.key for job in answerable],
            [job.max_new_tokens for job in answerable],
            # Index versions never change, so a passage id means one text within one.
            [f"{job.index.domain}/{job.index.version}" for job in answerable],
        )
        in_flight.update(zip(tickets, answerable))
        self._report(answering, in_flight)

    def _report(self, answering, in_flight: dict[int, AskJob]) -> None:
        """Note the first tokens of questions whose prefill ended, and add the prefix cache's and prefill's
        counts since the last report to the metrics (the backbone counts in plain numbers; it knows nothing
        of Prometheus)."""
        now = time.perf_counter()
        for ticket in answering.started():
            job = in_flight[ticket]
            job.timings["first_token"] = now - job.admitted
        cache, metrics = self._prefixes, self._metrics
        totals = {"hits": cache.hits, "misses": cache.misses, **cache.evictions}
        counters = {
            "hits": metrics.kv_cache_hits,
            "misses": metrics.kv_cache_misses,
            **{reason: metrics.kv_cache_evictions.labels(reason) for reason in cache.evictions},
        }
        prefill = answering.prefill_tokens()
        if prefill is not None:
            for kind, tokens in zip(("padding", "real"), prefill):
                metrics.prefill_tokens.labels(kind).inc(tokens)
        for name, total in totals.items():
            counters[name].inc(total - self._reported.get(name, 0))
        self._reported = totals
        metrics.kv_cache_bytes.set(cache.nbytes)

    def _step(self, answering, in_flight: dict[int, AskJob]) -> None:
        """One decoding step for every question in flight; answers those that finished."""
        if answering.rows:
            self._metrics.batch_rows.observe(len(in_flight))
            self._metrics.batch_adapters.observe(len({job.adapter for job in in_flight.values()}))
        tokenizer = self._backbone.generator.tokenizer
        answered = answering.step()
        self._report(answering, in_flight)
        for ticket, answer in answered:
            job = in_flight.pop(ticket)
            now = time.perf_counter()
            job.timings["generate"] = now - job.generating_since
            job.timings.setdefault("first_token", now - job.admitted)  # no passages: no prefill
            tokens = len(tokenizer(answer.text, add_special_tokens=False).input_ids) if answer.text else 0
            self._finish(job, AskResult(answer, job.hits, dict(job.timings), tokens))


def _dense_scores(
    handle: IndexHandle, queries: np.ndarray, results: list[list[Hit]], k: int
) -> list[list[float]]:
    """The query-passage dot products of BM25 or fused hits, which is what the generator's document posterior
    (RAG's p(z|x)) is made for; fused and BM25 scores are on other scales. A hit outside the dense top `depth`
    gets the depth-th dot product, an upper bound of its own."""
    depth = min(max(k, handle.config.fusion_depth), handle.size)
    dense = handle.search(queries, k=depth, mode="dense")  # [n][depth] hits
    scores = []
    for hits, candidates in zip(results, dense):
        by_id = {hit.passage.id: hit.score for hit in candidates}
        floor = candidates[-1].score if candidates else 0.0
        scores.append([by_id.get(hit.passage.id, floor) for hit in hits])
    return scores


def _deliver(job: AskJob, outcome: AskResult | BaseException) -> None:
    """Resolve the job's asyncio future from the worker thread (a no-op if the client already gave up)."""

    def resolve() -> None:
        if job.future.done():
            return
        if isinstance(outcome, BaseException):
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)

    with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is waiting any more
        job.loop.call_soon_threadsafe(resolve)

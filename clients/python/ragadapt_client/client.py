"""The synchronous client. ``AsyncClient`` (async_client.py) has the same surface with ``await``: it is
generated from this file (``python generate_async.py``, beside pyproject.toml), so edit this one."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack
from typing import Any, Literal, TypeVar

import httpx
from pydantic import BaseModel

from ragadapt_client import endpoints
from ragadapt_client.config import ClientConfig
from ragadapt_client.endpoints import Call, Records
from ragadapt_client.models import (
    Answer,
    Checkpoint,
    DomainInfo,
    GcReport,
    Health,
    Hyperparameters,
    JobInfo,
    PromotePolicy,
    Readiness,
    Retrieval,
    RunEvent,
    RunEvents,
    RunInfo,
    RunMode,
    RunResources,
)
from ragadapt_client.retries import Attempts, RetryPolicy
from ragadapt_client.waiting import JobProgress, PollSchedule, RunProgress, job_outcome, run_outcome

T = TypeVar("T")
log = logging.getLogger("ragadapt_client")


class Client:
    """Talks to one ragadapt server.

    Arguments fall back to ``RAGADAPT_URL`` (default ``http://localhost:8080``), ``RAGADAPT_ADMIN_TOKEN``,
    ``RAGADAPT_API_KEY``, ``RAGADAPT_TIMEOUT`` and ``RAGADAPT_MAX_RETRIES``. ``timeout`` is seconds per
    request or an ``httpx.Timeout``. Use it as a context manager, or call ``close()``.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        admin_token: str | None = None,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int | None = None,
        retry: RetryPolicy | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._config = ClientConfig.resolve(
            base_url, admin_token, api_key, timeout, max_retries, retry, headers
        )
        self._http = httpx.Client(base_url=self._config.base_url, timeout=self._config.timeout)
        self.domains = Domains(self)
        self.jobs = Jobs(self)
        self.runs = Runs(self)

    @property
    def base_url(self) -> str:
        return self._config.base_url

    def ask(
        self,
        domain: str,
        question: str,
        *,
        top_k: int | None = None,
        max_new_tokens: int | None = None,
        retrieval: Retrieval | None = None,
        return_passages: bool | None = None,
    ) -> Answer:
        """Answer ``question`` from ``domain``'s passages with its live adapter. Unset options take the
        server's defaults (top_k 5, max_new_tokens 32, the domain's retrieval, passages returned)."""
        call = endpoints.ask(domain, question, top_k, max_new_tokens, retrieval, return_passages)
        return self._send(call)

    def health(self) -> Health:
        """Liveness: the process answers."""
        return self._send(endpoints.health())

    def ready(self) -> Readiness:
        """Readiness: backbone loaded and store reachable; raises ``ServiceUnavailableError`` otherwise."""
        return self._send(endpoints.ready())

    def gc(
        self, *, apply: bool = False, keep_last: int | None = None, domains: Iterable[str] | None = None
    ) -> GcReport:
        """Old versions (beyond the newest ``keep_last`` of each kind per domain, live and pinned ones kept)
        and what faults left behind: what would go, or with ``apply`` what went. Admin token."""
        return self._send(endpoints.gc(apply, keep_last, domains))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _send(self, call: Call[T]) -> T:
        attempts = Attempts(call, self._config.retry, uuid.uuid4().hex)
        headers = self._config.headers_for(call)
        while True:
            with ExitStack() as files:
                request = attempts.request(self._http, headers, files)
                try:
                    response = self._http.send(request)
                except httpx.HTTPError as exc:
                    outcome = attempts.failed(exc, request)
                else:
                    outcome = attempts.answered(response)
            if outcome.retry_in is None:
                return outcome.result()
            log.info(
                "retrying %s %s in %.2fs after %s (retry %d)",
                call.method,
                call.path,
                outcome.retry_in,
                outcome.error,
                attempts.retries,
            )
            time.sleep(outcome.retry_in)


class Domains:
    """Knowledge domains: read them with the API key, create and move them with the admin token."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def list(self) -> list[DomainInfo]:
        return self._client._send(endpoints.list_domains())

    def get(self, name: str) -> DomainInfo:
        return self._client._send(endpoints.get_domain(name))

    def create(
        self,
        name: str,
        passages: Records | None = None,
        *,
        qa: Records | None = None,
        description: str | None = None,
        retrieval: Retrieval | None = None,
        passages_uri: str | None = None,
    ) -> Job:
        """Create a domain from passages (a JSONL path, or records with ``id``, ``title``, ``text``) or from
        ``passages_uri`` already in the store, with optional QA pairs. Ingestion and the first index build run
        in the background: ``.wait()`` on the returned job."""
        created = self._client._send(
            endpoints.create_domain(name, passages, passages_uri, qa, description, retrieval)
        )
        return Job(self._client, created.job)

    def promote(self, name: str, version: str, expected_etag: str | None = None) -> DomainInfo:
        """Make adapter ``version`` live. With ``expected_etag`` (from ``get(name).etag``) the promotion only
        lands if nobody changed the domain since; otherwise it raises ``ConflictError`` (version_conflict)."""
        return self._client._send(endpoints.promote(name, version, expected_etag))

    def rollback(self, name: str, expected_etag: str | None = None) -> DomainInfo:
        """Return the domain to its previous live state (conditionally, like ``promote``)."""
        return self._client._send(endpoints.rollback(name, expected_etag))

    def rebuild(self, name: str) -> Job:
        """Build the domain's index again (from its live passages, or from the passages of a first build that
        failed); ``.wait()`` on the returned job. ``ConflictError`` (build_in_progress) while one runs."""
        return Job(self._client, self._client._send(endpoints.rebuild_domain(name)))

    def delete(self, name: str) -> None:
        """Delete the domain and every version of it. ``ConflictError`` (domain_in_use) while a run of it is
        queued or running; deleting again finishes a deletion that was interrupted."""
        self._client._send(endpoints.delete_domain(name))


class Jobs:
    """Background jobs (ingest, rebuild)."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def get(self, job_id: str) -> JobInfo:
        return self._client._send(endpoints.get_job(job_id))

    def attach(self, job_id: str) -> Job:
        """A handle on an existing job, to ``wait()`` on it."""
        return Job(self._client, self.get(job_id))


class Runs:
    """Adaptation runs (LoRA training of a domain's adapter)."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def create(
        self,
        domain: str,
        *,
        mode: RunMode = "end2end",
        promote: PromotePolicy = "if_better",
        split: str | None = None,
        uri: str | None = None,
        examples: Iterable[Mapping[str, Any] | BaseModel] | None = None,
        hyperparameters: Hyperparameters | Mapping[str, Any] | None = None,
        reconstruction: Mapping[str, Any] | None = None,
        synthetic: Mapping[str, Any] | bool = True,
        use_qa: bool = True,
        promote_metric: Literal["recall@5", "f1"] | None = None,
        metadata: Mapping[str, str] | None = None,
        resources: RunResources | Mapping[str, Any] | None = None,
    ) -> Run:
        """Queue a run training on the domain's QA ``split`` (default ``train``), on QA at a store ``uri``, or
        on ``examples``, plus ``synthetic`` data made from the domain's passages (``True``: the server's
        default, inverse-cloze pairs; a mapping such as ``{"generated": {"max_passages": 300}}``; ``False``:
        none). ``use_qa=False`` trains on synthetic data alone. ``promote_metric``: what ``if_better`` needs a
        significant gain on. Unset hyperparameters take the server's defaults; ``metadata`` labels the run (at
        most 16 strings, read back on it); ``resources`` is what it asks a Ray cluster for (CPUs, GPUs,
        memory; servers running runs on Ray). ``.wait()`` on the returned run."""
        info = self._client._send(
            endpoints.create_run(
                domain,
                mode,
                promote,
                split,
                uri,
                examples,
                hyperparameters,
                reconstruction,
                synthetic,
                use_qa,
                promote_metric,
                metadata,
                resources,
            )
        )
        return Run(self._client, info)

    def get(self, run_id: str) -> RunInfo:
        return self._client._send(endpoints.get_run(run_id))

    def list(self, domain: str | None = None) -> list[RunInfo]:
        """Runs, newest first; only ``domain``'s when given."""
        return self._client._send(endpoints.list_runs(domain))

    def cancel(self, run_id: str) -> RunInfo:
        """Ask a run to stop; raises ``ConflictError`` (run_finished) if it already finished."""
        return self._client._send(endpoints.cancel_run(run_id))

    def events(self, run_id: str, after: int = 0, limit: int | None = None) -> RunEvents:
        """One page of the run's events after sequence number ``after`` (at most ``limit``, by default the
        server's 100); pass its ``next`` as ``after`` for the page that follows."""
        return self._client._send(endpoints.run_events(run_id, after, limit))

    def checkpoints(self, run_id: str) -> list[Checkpoint]:
        """The run's checkpoints, newest first: adapter versions to evaluate or promote."""
        return self._client._send(endpoints.run_checkpoints(run_id))

    def attach(self, run_id: str) -> Run:
        """A handle on an existing run, to ``wait()`` on it or follow its events."""
        return Run(self._client, self.get(run_id))


class Job:
    """A background job. ``info`` is its state as last seen."""

    def __init__(self, client: Client, info: JobInfo) -> None:
        self._client = client
        self.info = info

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def domain(self) -> str:
        return self.info.domain

    def refresh(self) -> JobInfo:
        self.info = self._client.jobs.get(self.id)
        return self.info

    def wait(
        self,
        *,
        progress: bool = True,
        timeout: float | None = None,
        poll_interval: float = 0.5,
        max_poll_interval: float = 5.0,
    ) -> JobInfo:
        """Poll until the job finishes and return its final state; raises ``JobFailedError`` if it failed and
        ``WaitTimeoutError`` after ``timeout`` seconds (the job goes on)."""
        schedule = PollSchedule(poll_interval, max_poll_interval, timeout, f"job {self.id}")
        bar = JobProgress(self.info, progress)
        changed = True
        try:
            while not self.info.finished:
                time.sleep(schedule.next_delay(changed))
                before = (self.info.state, self.info.progress)
                self.refresh()
                changed = (self.info.state, self.info.progress) != before
                bar.update(self.info)
        finally:
            bar.close()
        return job_outcome(self.info)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(id={self.id!r}, kind={self.info.kind!r}, domain={self.domain!r}, "
            f"state={self.info.state!r})"
        )


class Run:
    """An adaptation run. ``info`` is its state as last seen."""

    def __init__(self, client: Client, info: RunInfo) -> None:
        self._client = client
        self.info = info
        self._after = 0

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def domain(self) -> str:
        return self.info.domain

    def refresh(self) -> RunInfo:
        self.info = self._client.runs.get(self.id)
        return self.info

    def cancel(self) -> RunInfo:
        self.info = self._client.runs.cancel(self.id)
        return self.info

    def checkpoints(self) -> list[Checkpoint]:
        """The run's checkpoints so far, newest first."""
        return self._client.runs.checkpoints(self.id)

    def wait(
        self,
        *,
        progress: bool = True,
        timeout: float | None = None,
        poll_interval: float = 0.5,
        max_poll_interval: float = 5.0,
    ) -> RunInfo:
        """Poll until the run finishes, showing steps and the latest loss in a progress bar, and return its
        final state. Raises ``RunFailedError`` / ``RunCancelledError`` if it did not succeed and
        ``WaitTimeoutError`` after ``timeout`` seconds (the run goes on)."""
        schedule = PollSchedule(poll_interval, max_poll_interval, timeout, f"run {self.id}")
        bar = RunProgress(self.info, progress)
        changed = True
        try:
            while not self.info.finished:
                time.sleep(schedule.next_delay(changed))
                before = (self.info.state, self.info.step)
                self.refresh()
                changed = (self.info.state, self.info.step) != before
                bar.update(self.info)
        finally:
            bar.close()
        return run_outcome(self.info)

    def events(
        self, *, follow: bool = False, poll_interval: float = 0.5, max_poll_interval: float = 5.0
    ) -> Iterator[RunEvent]:
        """The events this handle has not yielded yet. With ``follow`` it keeps polling until the run finished
        and its last event was yielded."""
        schedule = PollSchedule(poll_interval, max_poll_interval, None, f"run {self.id}")
        finished = False
        while True:
            page = self._client.runs.events(self.id, self._after)
            for event in page.events:
                self._after = event.seq  # a consumer that stops early resumes after what it saw
                yield event
            self._after = page.next
            if page.events or page.has_more:
                continue
            if not follow or finished:
                return
            finished = self.refresh().finished
            if not finished:
                time.sleep(schedule.next_delay(changed=False))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(id={self.id!r}, domain={self.domain!r}, state={self.info.state!r}, "
            f"step={self.info.step})"
        )

"""Background jobs of the admin API: a new domain's ingestion and first index build.

Each job is an `indexing.rebuild.RebuildJob`: chunking, encoding and FAISS/BM25 building run in a worker
process (never in the serving process's model thread), the passages and index versions are published, and the
live pointer is moved; the catalog then opens the new index at once. Jobs live in memory: what they produce
lives in the store, so a restart loses only the progress display of a job that was running.
"""

from __future__ import annotations

import logging
import shutil
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from backbone import BackboneConfig
from indexing import IndexConfig
from indexing.encoder import EncodeConfig
from indexing.rebuild import RebuildJob, RebuildResult, RebuildSpec, RebuildState
from indexing.versions import IndexVersions

from .errors import JobNotFound
from .metrics import Metrics
from .schemas import JobInfo

log = logging.getLogger(__name__)

# How far along a job is, by the rebuild stage it reports; encoding spans most of the time.
_STAGE_PROGRESS = {"pending": 0.0, "preparing": 0.02, "starting": 0.05, "loading": 0.1, "reading": 0.15,
                   "indexing": 0.9, "publishing": 0.95, "flipping": 0.98, "done": 1.0}
_KEEP = 1000  # finished jobs remembered


class _Job:
    def __init__(self, id: str, kind: str, rebuild: RebuildJob, input_dir: Path):
        self.id = id
        self.kind = kind
        self.rebuild = rebuild
        self.input_dir = input_dir
        self.result: dict | None = None

    def info(self) -> JobInfo:
        rebuild = self.rebuild
        progress = rebuild.progress
        if progress.stage == "encoding":
            fraction = 0.15 + 0.75 * progress.fraction
        else:
            fraction = _STAGE_PROGRESS.get(progress.stage, 0.0)
        state = rebuild.status.value
        error = None if rebuild.error is None else f"{rebuild.error_code}: {rebuild.error}"
        return JobInfo(id=self.id, kind=self.kind, domain=rebuild.domain, state=state,
                       progress=1.0 if rebuild.status is RebuildState.SUCCEEDED else round(fraction, 3),
                       error=error, result=self.result)


class Jobs:
    def __init__(self, versions: IndexVersions, backbone: BackboneConfig, work_dir: Path, metrics: Metrics,
                 on_live: Callable[[str], object]):
        self._versions = versions
        self._backbone = backbone
        self._work_dir = Path(work_dir)
        self._metrics = metrics
        self._on_live = on_live
        self._jobs: OrderedDict[str, _Job] = OrderedDict()
        self._lock = threading.Lock()

    def input_dir(self) -> tuple[str, Path]:
        """A fresh job id and the directory its input files go in (removed when the job ends)."""
        job_id = uuid.uuid4().hex[:16]
        directory = self._work_dir / "inputs" / job_id
        directory.mkdir(parents=True)
        return job_id, directory

    def ingest(self, job_id: str, domain: str, passages: Path, index: IndexConfig) -> JobInfo:
        """Start building `domain`'s first index from `passages` (a file or directory in the job's input)."""
        spec = RebuildSpec(domain=domain, backbone=self._backbone, passages=passages, index=index,
                           encode=EncodeConfig(progress=False))
        job: _Job | None = None

        def on_success(result: RebuildResult) -> None:
            job.result = {"index_version": result.index_version, "passages_version": result.passages_version,
                          "passages": result.info.passage_count, "seconds": result.seconds}
            self._metrics.rebuild_seconds.labels("ingest").observe(result.seconds)
            self._metrics.passages_encoded.labels(self._metrics.domain(domain)).inc(result.info.passage_count)
            self._on_live(domain)

        rebuild = RebuildJob(spec, self._versions, self._work_dir / "rebuilds", on_success=on_success)
        job = _Job(job_id, "ingest", rebuild, self._work_dir / "inputs" / job_id)
        with self._lock:
            self._jobs[job_id] = job
            self._forget_old()
        rebuild.start()
        log.info("job %s: ingesting domain %s from %s", job_id, domain, passages.name)
        return job.info()

    def get(self, job_id: str) -> JobInfo:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id!r}")
        return job.info()

    def sweep(self) -> None:
        """Remove the input files of finished jobs (called by the poller)."""
        with self._lock:
            finished = [job for job in self._jobs.values()
                        if job.rebuild.status.finished and job.input_dir.exists()]
        for job in finished:
            shutil.rmtree(job.input_dir, ignore_errors=True)

    def stop(self) -> None:
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            job.rebuild.cancel()
        for job in jobs:
            job.rebuild.wait(15)
        self.sweep()

    def _forget_old(self) -> None:
        finished = [job_id for job_id, job in self._jobs.items() if job.rebuild.status.finished]
        for job_id in finished[: max(0, len(self._jobs) - _KEEP)]:
            del self._jobs[job_id]

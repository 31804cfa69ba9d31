"""Garbage collection: old versions nobody needs, and what faults leave behind in the store and on disk.

Runs only when asked (`ragadapt gc`, `POST /admin/gc`) and says what it would delete unless told to apply.
Per domain it keeps the newest `keep_last` versions of each kind, the live and pinned ones, what kept versions
need (the index a kept adapter version names, the passages of a kept index) and the adapter versions queued or
running adaptation runs start from (`storage.DomainRegistry.gc`). Besides old versions it removes:

- versions without a manifest (a publish that failed), once untouched for `incomplete_older_than`;
- checkpoints and mid-run indexes of runs that ended (their worker died before it cleaned up), and objects of
  runs without a record (a submit that failed half-way);
- the stored passages of finished jobs, except those a domain without an index may still be rebuilt from;
- domains whose deletion was interrupted (the deletion is finished, unless a run still uses the domain);
- runs left validating without a queue marker (their submit died before it queued them) are marked failed;
- in a server: local scratch directories no job or run worker of that server uses.
"""

from __future__ import annotations

import logging
import shutil
from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pydantic import BaseModel

from adapters.queue import SUBMIT_GRACE_S, fail_stuck_submit
from adapters.records import RunRecord, RunStore
from adapters.spec import RunState
from storage import DomainRegistry, ObjectStore
from storage.artifacts import VERSION_ID

from .errors import JobNotFound
from .jobs import PASSAGES, JobStore

log = logging.getLogger(__name__)


class GcReport(BaseModel):
    """What one collection deleted (or, in a dry run, would delete)."""

    dry_run: bool
    keep_last: int
    versions: list[str]  # "<domain>/<kind>/<version>": old versions and versions without a manifest
    runs: list[str]  # runs whose leftover checkpoints, mid-run indexes or orphaned objects go
    failed_runs: list[str]  # runs stuck validating, marked failed
    job_inputs: list[str]  # jobs whose stored passages go
    domains: list[str]  # domains whose interrupted deletion is finished
    scratch: list[str]  # local scratch directories, relative to the data directory


def collect(
    store: ObjectStore,
    *,
    keep_last: int,
    dry_run: bool = True,
    domains: Iterable[str] | None = None,
    incomplete_older_than: timedelta = timedelta(hours=1),
) -> GcReport:
    """Collect the store (blocking). `domains`: only those (their versions); None: all, and the run, job and
    deletion leftovers too."""
    registry, runs = DomainRegistry(store), RunStore(store)
    records = runs.list()
    active = [record for record in records if not record.state.finished]
    in_use = defaultdict(set)  # domain -> adapter versions active runs start from
    for record in active:
        if record.parent:
            in_use[record.domain].add(record.parent)
    names = list(domains) if domains is not None else [domain.name for domain in registry.list_domains()]
    versions = []
    for name in names:
        deleted = registry.gc(
            name,
            keep_last,
            incomplete_older_than=incomplete_older_than,
            protect=in_use[name],
            dry_run=dry_run,
        )
        versions += [f"{name}/{entry}" for entry in deleted]
    report = GcReport(
        dry_run=dry_run,
        keep_last=keep_last,
        versions=versions,
        runs=[],
        failed_runs=[],
        job_inputs=[],
        domains=[],
        scratch=[],
    )
    if domains is not None:
        return report
    report.runs = _run_leftovers(runs, records, dry_run, incomplete_older_than)
    report.failed_runs = _stuck_submits(runs, records, dry_run)
    report.job_inputs = _job_inputs(store, registry, dry_run, incomplete_older_than)
    busy = {record.domain for record in active}
    for name in registry.deleting_domains():
        if name in busy:
            log.warning("domain %s stays half-deleted while a run of it is queued or running", name)
            continue
        if not dry_run:
            registry.delete_domain(name)
        report.domains.append(name)
    return report


def sweep_scratch(data_dir: Path, candidates: Iterable[Path], in_use: set[Path], dry_run: bool) -> list[str]:
    """The `candidates` (local scratch directories) that nothing running in this server uses."""
    swept = []
    for entry in sorted(candidates):
        if entry in in_use or not entry.is_dir():
            continue
        if not dry_run:
            shutil.rmtree(entry, ignore_errors=True)
        swept.append(entry.relative_to(data_dir).as_posix())
    return swept


def _run_leftovers(
    runs: RunStore, records: list[RunRecord], dry_run: bool, older_than: timedelta
) -> list[str]:
    by_run = defaultdict(list)
    for info in runs.store.list("runs/"):
        parts = info.key.split("/")
        if len(parts) >= 3 and VERSION_ID.fullmatch(parts[1]):
            by_run[parts[1]].append(info)
    known = {record.id: record for record in records}
    cutoff = datetime.now(UTC) - older_than
    cleaned = []
    for run_id, objects in sorted(by_run.items()):
        record = known.get(run_id)
        if record is None:  # no run.json: a submit that failed half-way, once nothing is written any more
            if max(info.last_modified for info in objects) < cutoff:
                if not dry_run:
                    for info in objects:
                        runs.store.delete(info.key)
                cleaned.append(run_id)
            continue
        leftovers = [info for info in objects if info.key.split("/")[2] in ("checkpoints", "indexes")]
        if record.state.finished and leftovers:
            if not dry_run:
                runs.drop_artifacts(run_id)
            cleaned.append(run_id)
    return cleaned


def _stuck_submits(runs: RunStore, records: list[RunRecord], dry_run: bool) -> list[str]:
    """Validating runs without a queue marker, older than any submit takes: nothing will ever queue them."""
    queued = set(runs.active())
    cutoff = datetime.now(UTC) - timedelta(seconds=SUBMIT_GRACE_S)
    stuck = [
        record.id
        for record in records
        if record.state == RunState.VALIDATING and record.id not in queued and record.created_at < cutoff
    ]

    if not dry_run:
        for run_id in stuck:
            fail_stuck_submit(runs, run_id)
    return stuck


def _job_inputs(
    store: ObjectStore, registry: DomainRegistry, dry_run: bool, older_than: timedelta
) -> list[str]:
    """Stored passages of finished jobs, except those of a domain's current build job, which a domain whose
    first build failed is rebuilt from (also when the job itself was lost before it was recorded). Passages
    written lately may belong to a domain being created: they stay `older_than`."""
    jobs = JobStore(store)
    needed = set()
    for domain in registry.list_domains():
        if domain.build_job is None:
            continue
        needed.add(JobStore.key(domain.build_job, PASSAGES))
        try:
            record = jobs.get(domain.build_job)
        except JobNotFound:  # lost before it was recorded: its own input is kept above
            continue
        if record.input:
            needed.add(record.input)
    active = set(jobs.active())
    cutoff = datetime.now(UTC) - older_than
    swept = []
    for info in store.list("jobs/"):
        parts = info.key.split("/")
        if len(parts) != 3 or parts[2] != PASSAGES or info.key in needed or parts[1] in active:
            continue
        if info.last_modified >= cutoff:
            continue
        if not dry_run:
            store.delete(info.key)
        swept.append(parts[1])
    return swept

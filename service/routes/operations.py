"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from anyio import to_thread
from litestar import Response, get
from litestar.di import NamedDependency

from ..errors import RunWorkersDown
from ..problems import ProblemOperation, problem_responses
from ..runtime import Runtime
from ..schemas import Health, Ready, RunWorkers


@get("/healthz", tags=["operations"], operation_id="healthz", summary="Liveness")
async def healthz() -> Health:
    return Health(status="alive")


@get(
    "/readyz",
    tags=["operations"],
    operation_id="readyz",
    summary="Readiness: backbone loaded and store reachable",
    operation_class=ProblemOperation,
    responses=problem_responses(503),
)
async def readyz(runtime: NamedDependency[Runtime]) -> Ready:
    """503 (`not_ready`) while the backbone loads, `store_unavailable` while the store cannot be reached,
    `run_workers_down` when the thread that replaces dead run workers has ended."""
    loaded = runtime.serving()
    await to_thread.run_sync(runtime.store.ping)
    runs = runtime.runs
    if runs.supervisor == "dead":
        raise RunWorkersDown(
            "the supervisor of the adaptation-run workers has ended: dead workers are not "
            "replaced and runs stay queued; restart the server"
        )
    expected = runs.max_concurrent if runs.supervisor == "running" else 0
    return Ready(
        status="ready",
        backbone=loaded.backbone.fingerprint,
        store=runtime.store.name(),
        runs=RunWorkers(supervisor=runs.supervisor, workers=runs.alive_workers, expected=expected),
        building=loaded.jobs.building(),
    )


@get(
    "/metrics",
    tags=["operations"],
    operation_id="metrics",
    summary="Prometheus metrics",
    media_type="text/plain",
)
async def metrics(runtime: NamedDependency[Runtime]) -> Response[bytes]:
    body = await to_thread.run_sync(runtime.metrics.exposition)
    return Response(body, media_type=runtime.metrics.content_type)

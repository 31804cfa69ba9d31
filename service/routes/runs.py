"""Adaptation runs (admin): submit, list, follow, cancel. The run manager validates, persists and trains."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from anyio import to_thread
from litestar import Response, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter
from pydantic import BaseModel

from adapters.spec import RunInfo, RunRequest, RunState
from storage.registry import DOMAIN_NAME

from ..auth import admin_guard
from ..errors import InvalidRequest
from ..problems import ProblemOperation, problem_responses
from ..run_checks import check_batch_fits, check_lora_targets
from ..runtime import Runtime


class RunList(BaseModel):
    runs: list[RunInfo]


class RunEvents(BaseModel):
    events: list[dict[str, Any]]
    next: int  # the cursor: pass as `after` to get the events that follow
    has_more: bool  # more events follow already (else wait for the run to add some)


class Checkpoint(BaseModel):
    step: int
    created_at: datetime
    adapter_version: str  # evaluate or promote it like any adapter version of the domain
    metrics: dict[str, float]  # of the step it was taken at: loss, lr, examples_per_s


class RunCheckpoints(BaseModel):
    checkpoints: list[Checkpoint]  # newest first


_ADMIN = dict(guards=[admin_guard], tags=["runs"], operation_class=ProblemOperation)


def adapt_handler(max_body_bytes: int):
    """POST /admin/adapt, with a body limit of its own: inline examples are read into memory, so large
    training sets go as a store key (`train.uri`) or in the domain's QA set."""

    @post(
        "/admin/adapt",
        status_code=202,
        operation_id="adapt",
        summary="Start an adaptation run",
        request_max_body_size=max_body_bytes,
        responses=problem_responses(401, 404, 413, 422, 503),
        **_ADMIN,
    )
    async def adapt(data: JSONBody[RunRequest], runtime: NamedDependency[Runtime]) -> Response[RunInfo]:
        """Validated before it is queued (`404 domain_not_found`, `422 invalid_run`); a worker trains it."""
        loaded = runtime.serving()
        check_lora_targets(loaded.backbone, data)
        check_batch_fits(data, loaded.max_batch_passages)
        info = await to_thread.run_sync(runtime.runs.submit, data)
        return Response(info, status_code=202)

    return adapt


@get(
    "/admin/runs",
    operation_id="listRuns",
    summary="List adaptation runs, newest first",
    responses=problem_responses(401, 422, 503),
    **_ADMIN,
)
async def list_runs(
    runtime: NamedDependency[Runtime], domain: Annotated[str | None, QueryParameter(max_length=63)] = None
) -> RunList:
    if domain is not None and not DOMAIN_NAME.fullmatch(domain):
        raise InvalidRequest(f"domain: {domain!r} is not a domain name (^{DOMAIN_NAME.pattern}$)")
    return RunList(runs=await to_thread.run_sync(runtime.runs.list, domain))


@get(
    "/admin/runs/{run_id:str}",
    operation_id="getRun",
    summary="One adaptation run",
    responses=problem_responses(401, 404, 503),
    **_ADMIN,
)
async def get_run(run_id: FromPath[str], runtime: NamedDependency[Runtime]) -> RunInfo:
    """A run reported here as promoted is what this server's `/ask` serves: the domain's live pointer is
    re-read at once rather than at the next poll (read your writes)."""
    info = await to_thread.run_sync(runtime.runs.get, run_id)
    loaded = runtime.loaded
    if info.promoted and info.state == RunState.SUCCEEDED and loaded is not None:
        serving = loaded.catalog.find(info.domain)
        if serving is not None and serving.adapter_version != info.adapter_version:
            await to_thread.run_sync(loaded.catalog.refresh_domain, info.domain)
    return info


@get(
    "/admin/runs/{run_id:str}/events",
    operation_id="getRunEvents",
    summary="A run's events after a sequence number",
    responses=problem_responses(401, 404, 422, 503),
    **_ADMIN,
)
async def run_events(
    run_id: FromPath[str],
    runtime: NamedDependency[Runtime],
    after: Annotated[int, QueryParameter(ge=0)] = 0,
    limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
) -> RunEvents:
    """A page of at most `limit` events with seq > `after`; `next` is the `after` of the following page."""
    events, next_seq, more = await to_thread.run_sync(runtime.runs.events, run_id, after, limit)
    return RunEvents(events=events, next=next_seq, has_more=more)


@get(
    "/admin/runs/{run_id:str}/checkpoints",
    operation_id="getRunCheckpoints",
    summary="A run's checkpoints, each an adapter version",
    responses=problem_responses(401, 404, 503),
    **_ADMIN,
)
async def run_checkpoints(run_id: FromPath[str], runtime: NamedDependency[Runtime]) -> RunCheckpoints:
    """Every `checkpoint_every` steps a run publishes its adapter set as an adapter version of the domain,
    which can be evaluated or promoted like the run's final one (its `adapter_version`)."""
    found = await to_thread.run_sync(runtime.runs.checkpoints, run_id)
    return RunCheckpoints(checkpoints=[Checkpoint.model_validate(c) for c in found])


@post(
    "/admin/runs/{run_id:str}/cancel",
    status_code=200,
    operation_id="cancelRun",
    summary="Cancel a run",
    responses=problem_responses(401, 404, 409, 503),
    **_ADMIN,
)
async def cancel_run(run_id: FromPath[str], runtime: NamedDependency[Runtime]) -> RunInfo:
    """A queued run ends at once; a running one at its worker's next step (`cancel_requested` until then)."""
    return await to_thread.run_sync(runtime.runs.cancel, run_id)

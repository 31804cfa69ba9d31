"""Scale-out benchmarks (issue 14): Ray Data re-encoding against the local pipeline with the same threads, the
time from submitting a run to its first training step on each executor, and FAISS build times of large-corpus
factories, from which docs/scaling.md projects 250k and 21M passages. Writes results, never asserts.

    .venv/bin/python benchmarks/bench_scaling.py                     # everything (about 40 min on 2 cores)
    .venv/bin/python benchmarks/bench_scaling.py --only encoding --synthetic 20000

Run it alone on the machine: both sides of each ratio use every core it is given.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters.qa import QaExample, QaSets  # noqa: E402
from adapters.ray_runs import RayRunManager  # noqa: E402
from adapters.spec import RunRequest, RunResources  # noqa: E402
from adapters.supervisor import RunManager  # noqa: E402
from backbone import Backbone, Passage, embedded_default_config  # noqa: E402
from indexing.builder import build_faiss  # noqa: E402
from indexing.chunking import load_corpus  # noqa: E402
from indexing.encoder import EncodeConfig, encode_passages  # noqa: E402
from indexing.ingest import ingest  # noqa: E402
from indexing.ray_encoding import RayEncoding  # noqa: E402
from indexing.raycluster import RayCluster, connect, joined  # noqa: E402
from storage import LocalStore  # noqa: E402

from reporting import record  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def synthetic_passages(source: list[Passage], count: int, seed: int = 0) -> list[Passage]:
    """`count` passages of about 100 words drawn from the words of `source`, so their length and vocabulary
    are a real domain's."""
    rng = random.Random(seed)
    words = [w for p in source for w in p.text.split()]
    lengths = [len(p.text.split()) for p in source]
    return [
        Passage(
            id=f"synthetic-{i}",
            title=f"synthetic {i}",
            text=" ".join(rng.choices(words, k=rng.choice(lengths))),
        )
        for i in range(count)
    ]


def encode_rate(backbone: Backbone, passages: list[Passage], config: EncodeConfig) -> tuple[dict, np.ndarray]:
    started = time.perf_counter()
    embeddings = encode_passages(backbone, passages, config=config)  # [n, dim]
    seconds = time.perf_counter() - started
    return {
        "passages": len(passages),
        "seconds": round(seconds, 2),
        "per_s": round(len(passages) / seconds, 1),
    }, embeddings


def bench_encoding(backbone: Backbone, cluster: RayCluster, cores: int, synthetic: int) -> dict:
    """Local (one process, `cores` torch threads) against Ray Data (`cores` actors of one CPU each)."""
    covid = load_corpus(DATA / "covid" / "passages.jsonl")
    corpora = {"covid": covid, f"synthetic_{synthetic}": synthetic_passages(covid, synthetic)}
    results = {}
    for name, passages in corpora.items():
        torch.set_num_threads(cores)
        local, local_embeddings = encode_rate(backbone, passages, EncodeConfig(progress=False))
        ray_config = EncodeConfig(progress=False, ray=RayEncoding(cluster, batch_size=64, concurrency=cores))
        on_ray, ray_embeddings = encode_rate(backbone, passages, ray_config)
        cosine = (local_embeddings * ray_embeddings).sum(1) / (
            np.linalg.norm(local_embeddings, axis=1) * np.linalg.norm(ray_embeddings, axis=1)
        )
        results[name] = {
            "local": local,
            "ray": on_ray,
            "ray_over_local": round(on_ray["per_s"] / local["per_s"], 3),
            "min_cosine": round(float(cosine.min()), 6),
        }
        print(name, results[name], flush=True)
    return results


def bench_faiss(dim: int, count: int) -> dict:
    """Build seconds of the factories docs/scaling.md recommends, on `count` random unit vectors."""
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((count, dim), dtype=np.float32)  # [n, dim]
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    results = {}
    for factory in ("Flat", "HNSW32", "IVF1024,Flat", "IVF1024,PQ32"):
        started = time.perf_counter()
        build_faiss(embeddings, factory)
        results[factory] = round(time.perf_counter() - started, 2)
        print(factory, results[factory], flush=True)
    return {"vectors": count, "dim": dim, "build_seconds": results}


def bench_first_step(backbone_config, cluster: RayCluster, work: Path, cores: int) -> dict:
    """Seconds from submit to the run's first training step, on each executor, over the conversations domain
    with evaluation off (what precedes the first step is then claiming, loading and the training data)."""
    passages = load_corpus(DATA / "conversations" / "passages.jsonl")
    rows = [json.loads(line) for line in (DATA / "conversations" / "qa.jsonl").read_text().splitlines()]
    qa = [QaExample(r["question"], tuple(r["answers"]), tuple(r["passage_ids"]), r["split"]) for r in rows]
    body = {
        "domain": "conversations",
        "mode": "end2end",
        "promote": "never",
        "evaluation": None,
        "train": {"split": "train"},
        "hyperparameters": {
            "steps": 3,
            "retriever_steps": 0,
            "batch_size": 2,
            "top_k": 3,
            "checkpoint_every": 100,
        },
    }
    results = {}
    for executor in ("local", "ray"):
        root = work / executor
        store = LocalStore(root / "store")
        source = root / "passages.jsonl"
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_text(
            "".join(json.dumps({"id": p.id, "title": p.title, "text": p.text}) + "\n" for p in passages)
        )
        ingest("conversations", source, store, backbone_config, cache_dir=root / "ingest")
        QaSets(store).publish("conversations", qa, source="bench")
        if executor == "local":
            manager = RunManager(store, backbone_config, root / "runs", max_concurrent=1, threads=cores)
        else:
            manager = RayRunManager(
                store, backbone_config, cluster, resources=RunResources(cpus=cores), poll_s=0.5
            )
        manager.start()
        if executor == "local":  # its worker loads the backbone once at start, before any run: not timed
            time.sleep(30)
        try:
            submitted = time.perf_counter()
            info = manager.submit(RunRequest.model_validate(body))
            while True:
                current = manager.get(info.id)
                if current.step >= 1 or current.state.finished:
                    break
                time.sleep(0.05)
            results[executor] = round(time.perf_counter() - submitted, 2)
            assert current.step >= 1, current.error
            while not manager.get(info.id).state.finished:
                time.sleep(0.5)
        finally:
            manager.stop()
        print(executor, results[executor], flush=True)
    return {
        "seconds_to_first_step": results,
        "ray_minus_local_s": round(results["ray"] - results["local"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["encoding", "first_step", "faiss"], action="append")
    parser.add_argument("--synthetic", type=int, default=100_000)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "ragadapt")
    parser.add_argument("--name", default="scaling", help="results/<name>.json")
    args = parser.parse_args()
    only = set(args.only or ["encoding", "first_step", "faiss"])
    config = embedded_default_config(cache_dir=args.cache_dir)
    cluster = RayCluster(num_cpus=args.cores, object_store_bytes=512 * 1024 * 1024)
    cluster = joined(cluster, connect(cluster))
    settings = {
        "cores": args.cores,
        "synthetic": args.synthetic,
        "dtype": "auto",
        "ray_local_cluster_cpus": args.cores,
    }
    results = {}
    if "encoding" in only:
        results["encoding"] = bench_encoding(Backbone.load(config), cluster, args.cores, args.synthetic)
    if "faiss" in only:
        results["faiss"] = bench_faiss(384, 200_000)
    if "first_step" in only:
        with tempfile.TemporaryDirectory() as work:
            results["first_step"] = bench_first_step(config, cluster, Path(work), args.cores)
    parts = []
    if "encoding" in results:
        parts += [
            f"{name} Ray/local {r['ray_over_local']}x ({r['ray']['per_s']} vs {r['local']['per_s']} per s)"
            for name, r in results["encoding"].items()
        ]
    if "first_step" in results:
        s = results["first_step"]["seconds_to_first_step"]
        parts.append(f"submit to first step: local {s['local']} s, Ray {s['ray']} s")
    if "faiss" in results:
        parts.append(
            "FAISS build on 200k: "
            + ", ".join(f"{k} {v} s" for k, v in results["faiss"]["build_seconds"].items())
        )
    record(args.name, settings, results, "; ".join(parts))


if __name__ == "__main__":
    main()

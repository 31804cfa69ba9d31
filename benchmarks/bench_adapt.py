"""Adaptation benchmark: base RAG vs generator-only fine-tuning + RAG vs RAG End2End + LoRA, per shared
domain.

    .venv/bin/python benchmarks/bench_adapt.py                       # conversations, finance, covid
    .venv/bin/python benchmarks/bench_adapt.py --domains finance --steps 10

For each domain: a subsample of its QA set (train and dev questions) and a sub-corpus holding every gold
passage of those questions, their neighbours in the same document and random other passages, ingested into
a fresh LocalStore with the embedded default backbone. Then two adaptation runs exactly as `ragadapt adapt`
executes them (same records, checkpoints, async index refresh), `generator_only` and `end2end`, never
promoted, and one `ragadapt eval` table on the dev questions: EM and F1 of the answers, recall@k of the
gold passages.

Writes `benchmarks/results/adapt.json` (settings, machine, date, numbers), `benchmarks/results/adapt.png`
and one line in `benchmarks/RESULTS.md`. The subsample sizes are part of the result: recall over a
sub-corpus of 500-600 passages is higher than over a domain's full corpus. The defaults fit about an hour
on 2 CPU cores (30 steps of 4 examples a run, passages clipped to 128 tokens for the generator, no
reconstruction examples: at this budget every step goes to the QA signal); a GPU affords real training
budgets.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters.cli import adapt, evaluate_modes  # noqa: E402
from adapters.execution import Workspace  # noqa: E402
from adapters.qa import QaExample, QaSets  # noqa: E402
from adapters.records import RunStore  # noqa: E402
from adapters.spec import RunRequest  # noqa: E402
from backbone import Backbone, embedded_default_config  # noqa: E402
from indexing.ingest import ingest  # noqa: E402
from storage import LocalStore  # noqa: E402

from reporting import RESULTS_DIR, record  # noqa: E402

DATA_DIR = ROOT.parent / "shared" / "data"
MODES = ("base", "generator_only", "end2end")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def subsample(domain: str, n_train: int, n_dev: int, n_passages: int, neighbours: int, seed: int):
    """(passages, train, dev): sampled questions and a sub-corpus holding all their gold passages."""
    rng = random.Random(seed)
    passages = read_jsonl(DATA_DIR / domain / "passages.jsonl")
    qa = read_jsonl(DATA_DIR / domain / "qa.jsonl")
    train = rng.sample([q for q in qa if q["split"] == "train" and q["passage_ids"]], n_train)
    dev = rng.sample([q for q in qa if q["split"] == "dev" and q["passage_ids"]], n_dev)
    position = {p["id"]: i for i, p in enumerate(passages)}
    keep: set[int] = set()
    for question in train + dev:
        for pid in question["passage_ids"]:
            i = position[pid]
            doc = pid.rsplit("-", 1)[0]
            for j in range(i - neighbours, i + neighbours + 1):
                if 0 <= j < len(passages) and passages[j]["id"].rsplit("-", 1)[0] == doc:
                    keep.add(j)
    others = [i for i in range(len(passages)) if i not in keep]
    rng.shuffle(others)
    keep.update(others[: max(n_passages - len(keep), 0)])
    corpus = [passages[i] for i in sorted(keep)]

    def example(q: dict) -> QaExample:
        return QaExample(q["question"], tuple(q["answers"]), tuple(q["passage_ids"]), q["split"], q["id"])

    return corpus, [example(q) for q in train], [example(q) for q in dev]


def run_domain(domain: str, args, backbone: Backbone, config, work: Path) -> dict:
    sizes = {
        "covid": args.covid_passages,
        "conversations": args.conversations_passages,
        "finance": args.finance_passages,
    }
    corpus, train, dev = subsample(domain, args.train, args.dev, sizes[domain], args.neighbours, args.seed)
    root = work / domain
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    store = LocalStore(root / "store")
    corpus_file = root / "passages.jsonl"
    corpus_file.write_text("".join(json.dumps(p) + "\n" for p in corpus))
    started = time.perf_counter()
    ingest(domain, corpus_file, store, config, backbone=backbone, cache_dir=root / "cache")
    ingest_s = time.perf_counter() - started
    QaSets(store).publish(domain, train + dev, source="bench_adapt subsample")
    workspace = Workspace(config, root / "work", {"none": backbone})

    runs = {}
    for mode in ("generator_only", "end2end"):
        hyperparameters = {
            "steps": args.steps,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "top_k": args.top_k,
            "reconstruction_ratio": args.reconstruction_ratio if mode == "end2end" else 0.0,
            "checkpoint_every": args.steps,
            "seed": args.seed,
            "warmup_steps": 2,
        }
        if mode == "end2end":
            hyperparameters["index_refresh_every"] = args.refresh_every
        request = RunRequest.model_validate(
            {
                "domain": domain,
                "mode": mode,
                "promote": "never",
                "evaluation": None,
                "hyperparameters": hyperparameters,
            }
        )
        started = time.perf_counter()
        info = adapt(store, config, request, root / "work", progress=True, workspace=workspace)
        seconds = time.perf_counter() - started
        if info.error:
            raise SystemExit(f"{domain} {mode} run failed: {info.error}")
        events, _ = RunStore(store).events(info.id)
        steps = [e for e in events if e["kind"] == "step"]
        tail = max(len(steps) // 5, 1)
        runs[mode] = {
            "run_id": info.id,
            "state": info.state.value,
            "seconds": round(seconds, 1),
            "adapter_version": info.adapter_version,
            "index_version": info.index_version,
            "loss_first": round(sum(e["loss"] for e in steps[:tail]) / tail, 4),
            "loss_last": round(sum(e["loss"] for e in steps[-tail:]) / tail, 4),
            "examples_per_s": round(sum(e["examples_per_s"] for e in steps) / len(steps), 3),
            "index_refreshes": [
                {k: e[k] for k in ("started_step", "step")}
                for e in events
                if e["kind"] == "rebuild" and e["state"] == "switched"
            ],
        }
        print(f"{domain} {mode}: {runs[mode]}", flush=True)

    reports = evaluate_modes(
        store,
        backbone,
        domain,
        split="dev",
        modes=MODES,
        top_k=args.eval_top_k,
        max_questions=args.eval_questions,
        max_new_tokens=args.max_new_tokens,
        work_dir=root / "eval",
    )
    from adapters.evaluation import format_table

    print(format_table(reports), flush=True)
    shutil.rmtree(root, ignore_errors=True)
    return {
        "sizes": {
            "passages": len(corpus),
            "passages_full": sum(1 for _ in (DATA_DIR / domain / "passages.jsonl").open()),
            "train": len(train),
            "dev": len(dev),
            "dev_answered": min(len(dev), args.eval_questions),
        },
        "ingest_s": round(ingest_s, 1),
        "runs": runs,
        "eval": {mode: report.to_dict() for mode, report in reports},
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(results)
    metrics = [("f1", "F1"), ("exact_match", "EM"), ("recall@5", "recall@5")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), sharey=True)
    width = 0.8 / len(MODES)
    for ax, (metric, label) in zip(axes, metrics):
        for m, mode in enumerate(MODES):
            values = []
            for domain in domains:
                report = results[domain]["eval"][mode]
                values.append(report["recall"]["5"] if metric == "recall@5" else report[metric])
            xs = [d + (m - (len(MODES) - 1) / 2) * width for d in range(len(domains))]
            bars = ax.bar(xs, values, width, label=mode)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(range(len(domains)), domains)
        ax.set_title(label)
        ax.set_ylim(0, 1)
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(
        "Dev split, embedded default backbone (subsampled domains; see adapt.json for sizes)", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--domains", nargs="+", default=["finance", "conversations", "covid"])
    parser.add_argument("--train", type=int, default=80, help="training questions sampled per domain")
    parser.add_argument(
        "--dev", type=int, default=60, help="dev questions sampled (recall is over all of them)"
    )
    parser.add_argument("--eval-questions", type=int, default=30, help="dev questions answered (EM/F1)")
    parser.add_argument("--conversations-passages", type=int, default=600)
    parser.add_argument("--finance-passages", type=int, default=600)
    parser.add_argument("--covid-passages", type=int, default=500)
    parser.add_argument(
        "--neighbours", type=int, default=2, help="same-document neighbours kept per gold passage"
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--top-k", type=int, default=2, help="passages per example in training")
    parser.add_argument("--eval-top-k", type=int, default=3, help="passages the answers are generated from")
    parser.add_argument("--refresh-every", type=int, default=10)
    parser.add_argument("--reconstruction-ratio", type=float, default=0.0)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument(
        "--max-passage-tokens",
        type=int,
        default=128,
        help="passage tokens the generator sees (train and eval)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="adapt", help="results/<name>.json and .png (a supplementary run)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/ragadapt-bench-adapt"))
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "ragadapt")
    args = parser.parse_args()
    import matplotlib  # noqa: F401  (pip install -e '.[bench]'): fail now, not after the runs

    started = time.perf_counter()
    config = embedded_default_config(cache_dir=args.cache_dir, max_passage_tokens=args.max_passage_tokens)
    backbone = Backbone.load(config)
    results = {}
    for domain in args.domains:
        results[domain] = run_domain(domain, args, backbone, config, args.work_dir)
    total_s = round(time.perf_counter() - started, 1)

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings.update(
        {
            "backbone": "embedded default: all-MiniLM-L6-v2 (both encoders) + SmolLM2-135M-Instruct",
            "dtype": str(backbone.dtype),
            "lora": "r=8 alpha=16 dropout=0.05 on Q/K/V of all three",
            "total_seconds": total_s,
        }
    )
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    plot(results, RESULTS_DIR / f"{args.name}.png")
    parts = []
    for domain, result in results.items():
        e = result["eval"]
        cells = " / ".join(
            f"{e[m]['exact_match']:.3f} {e[m]['f1']:.3f} {e[m]['recall']['5']:.3f}" for m in MODES
        )
        parts.append(
            f"{domain} ({result['sizes']['passages']} passages, {result['sizes']['train']} train, "
            f"{result['sizes']['dev']} dev / {result['sizes']['dev_answered']} answered) {cells}"
        )
    summary = (
        f"EM F1 recall@5 for base / generator_only / end2end, {args.steps} steps x {args.batch_size} "
        f"examples (train k={args.top_k}, answer k={args.eval_top_k}), {total_s / 60:.0f} min: "
        + "; ".join(parts)
    )
    path = record(args.name, settings, results, summary)
    print(f"wrote {path} and {RESULTS_DIR / f'{args.name}.png'}")


if __name__ == "__main__":
    main()

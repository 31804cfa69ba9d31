"""Knowledge injection benchmark: what adaptation does to retrieval and answers, on whole knowledge bases.

    .venv/bin/python benchmarks/bench_knowledge.py --domain finance
    .venv/bin/python benchmarks/bench_knowledge.py --domain covid \
        --modes base,bm25,generator_only,closed_book_ft

For each shared domain (`../shared/data/<domain>`), its FULL knowledge base is ingested into a fresh
LocalStore with the embedded default backbone and the default index settings (hybrid retrieval), its train and
dev QA published, and these modes run exactly as `ragadapt adapt` executes them (same records, checkpoints and
index refreshes), never promoted, then evaluated on the dev split:

- `bm25`: BM25 alone (no model; recall only).
- `base`: the base backbone, no adaptation.
- `generator_only`: the generator fine-tuned on the train QA with retrieval (FT + RAG).
- `closed_book_ft`: the same generator answering without passages (seed 003's FT-only).
- `end2end_marginal`: RAG End2End as published: the marginal loss alone, no retriever phase, no synthetic
  data.
- `end2end`: the defaults: synthetic inverse-cloze pairs, the contrastive retriever phase, then the joint
  phase (marginal + contrastive losses, RAFT gold passages).
- `passages_only`: no QA given: inverse-cloze pairs and generated questions only.
- `passages_ict`: no QA given and nothing generated: inverse-cloze pairs only, so the run is its retriever
  phase alone (no joint phase: there is nothing to answer). It tells the retriever phase's share of
  `passages_only` from that of its joint phase over the few generated questions.

Recall@1/5/20 (dense, BM25, hybrid) is over every dev question; EM and F1 are over a seeded random sample of
`--answered` dev questions (all of them where there are fewer), answered from the top `--top-k` passages of
the domain's serving mode (hybrid). Every figure has a 95% bootstrap interval, every difference to `base` a
paired one. One domain (or some modes of it) per invocation: results merge into
`benchmarks/results/knowledge.json` (top-level `domains`), with `knowledge.png` and one line in
`benchmarks/RESULTS.md` per domain piece.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters.cli import adapt  # noqa: E402
from adapters.evaluation import EvalReport, compare, evaluate  # noqa: E402
from adapters.execution import Workspace  # noqa: E402
from adapters.qa import QaExample, QaSets  # noqa: E402
from adapters.records import RunStore  # noqa: E402
from adapters.registry import AdapterRegistry  # noqa: E402
from adapters.spec import RunRequest  # noqa: E402
from backbone import Backbone, embedded_default_config  # noqa: E402
from indexing.ingest import ingest  # noqa: E402
from indexing.publish import base_index_version  # noqa: E402
from indexing.versions import IndexVersions  # noqa: E402
from storage import DomainRegistry, LocalStore  # noqa: E402

from reporting import RESULTS_DIR, record  # noqa: E402

DATA_DIR = ROOT.parent / "shared" / "data"
DOMAINS = ("covid", "conversations", "finance")
MODES = (
    "bm25",
    "base",
    "closed_book_ft",
    "generator_only",
    "end2end_marginal",
    "end2end",
    "passages_only",
    "passages_ict",
)
RUN_MODES = {  # benchmark mode -> the run that produces its adapter version
    "closed_book_ft": "generator_only",
    "generator_only": "generator_only",
    "end2end_marginal": "end2end_marginal",
    "end2end": "end2end",
    "passages_only": "passages_only",
    "passages_ict": "passages_ict",
}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def example(q: dict) -> QaExample:
    return QaExample(q["question"], tuple(q["answers"]), tuple(q["passage_ids"]), q["split"], q["id"])


def run_request(run: str, domain: str, args) -> RunRequest:
    """The adaptation run behind a benchmark mode, at this benchmark's CPU budget."""
    joint = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "top_k": args.train_top_k,
        "lr": args.lr,
        "warmup_steps": 2,
        "seed": args.seed,
        "checkpoint_every": 1000,
        "index_refresh_every": args.refresh_every,
    }
    retriever = {"retriever_epochs": args.retriever_epochs, "retriever_batch_size": args.retriever_batch_size}
    body: dict = {"domain": domain, "promote": "never", "evaluation": None}
    if run == "generator_only":
        body.update(
            mode="generator_only",
            train={"split": "train"},
            hyperparameters={**joint, "index_refresh_every": None, "retriever_steps": 0},
        )
    elif run == "end2end_marginal":
        body.update(
            mode="end2end",
            train={"split": "train"},
            hyperparameters={
                **joint,
                "retriever_steps": 0,
                "contrastive_weight": 0.0,
                "lm_supervision_weight": 0.0,
                "gold_passage_prob": 0.0,
            },
        )
    elif run == "end2end":
        body.update(
            mode="end2end", train={"split": "train", "synthetic": {}}, hyperparameters={**joint, **retriever}
        )
    elif run == "passages_only":
        synthetic = {"generated": {"max_passages": args.generated_passages}}
        body.update(mode="end2end", train={"synthetic": synthetic}, hyperparameters={**joint, **retriever})
    elif run == "passages_ict":
        body.update(mode="end2end", train={"synthetic": {}}, hyperparameters=retriever)
    else:
        raise ValueError(run)
    return RunRequest.model_validate(body)


def figures(report: EvalReport, base: EvalReport | None) -> dict:
    """The benchmark's view of a report: headline figures with intervals, differences to base."""
    out = {
        "recall_at_5": report.recall_at(5, "dense"),
        "recall_at_5_ci": report.recall_ci["dense"]["5"],
        "recall_at_1": report.recall_at(1, "dense"),
        "recall_at_20": report.recall_at(20, "dense"),
        "hybrid_recall_at_5": report.recall_at(5, "hybrid"),
        "hybrid_recall_at_5_ci": report.recall_ci.get("hybrid", {}).get("5"),
        "bm25_recall_at_5": report.recall_at(5, "bm25"),
        "f1": report.f1,
        "f1_ci": report.f1_ci,
        "em": report.exact_match,
        "em_ci": report.exact_match_ci,
        "answered": report.questions,
        "retrieval_questions": report.retrieval_questions,
        "closed_book": report.closed_book,
        "samples": report.samples[:3],
        "eval_seconds": report.seconds,
    }
    if base is not None:
        out["vs_base"] = {
            name: d.to_dict() if d is not None else None
            for name, d in compare(
                report, base, ["f1", "exact_match", "dense_recall@5", "hybrid_recall@5"]
            ).items()
        }
    return out


def run_domain(domain: str, modes: list[str], args, backbone: Backbone, config, work: Path, save) -> dict:
    """Measure `modes` on one domain; `save(update)` merges each finished part into the results file, so a
    piece that fails late keeps what it measured. Returns the domain's entry as saved last."""
    root = work / domain
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    store = LocalStore(root / "store")
    passages_file = DATA_DIR / domain / "passages.jsonl"
    started = time.perf_counter()
    ingest(domain, passages_file, store, config, backbone=backbone, cache_dir=root / "cache")
    ingest_s = time.perf_counter() - started
    qa = read_jsonl(DATA_DIR / domain / "qa.jsonl")
    train = [example(q) for q in qa if q["split"] == "train"]
    dev = [example(q) for q in qa if q["split"] == "dev"]
    random.Random(args.seed).shuffle(dev)  # the answered questions are a random sample; recall uses all
    QaSets(store).publish(domain, train + dev, source="bench_knowledge")
    workspace = Workspace(config, root / "work", {"none": backbone})
    domains = DomainRegistry(store)
    versions = IndexVersions(domains, root / "index-cache")
    adapters = AdapterRegistry(store)

    def evaluated(adapter_version: str | None, closed_book: bool = False) -> EvalReport:
        key = None
        if adapter_version is None:
            index_version = base_index_version(backbone, versions, domain, work_dir=root / "eval")
        else:
            index_version = adapters.get(domain, adapter_version).metadata["index_version"]
            # fetched once: closed_book_ft and generator_only share one version
            key = adapters.attach(backbone, adapters.ref(domain, adapter_version), root / "eval")
        try:
            handle = versions.open(
                domain, index_version, embedding_dim=backbone.embedding_dim, fingerprint=backbone.fingerprint
            )
            return evaluate(
                backbone,
                key,
                handle,
                dev,
                top_k=args.top_k,
                max_new_tokens=args.max_new_tokens,
                max_questions=args.answered,
                closed_book=closed_book,
                adapter_version=adapter_version,
            )
        finally:
            if key is not None:
                backbone.remove_adapter_set(key)

    base = evaluated(None)
    measured: dict = {}
    if "base" in modes:
        measured["base"] = figures(base, None)
    if "bm25" in modes:
        measured["bm25"] = {
            "recall_at_5": base.recall_at(5, "bm25"),
            "recall_at_5_ci": base.recall_ci["bm25"]["5"],
            "recall_at_1": base.recall_at(1, "bm25"),
            "recall_at_20": base.recall_at(20, "bm25"),
        }
    entry = save(
        {
            "passages": sum(1 for _ in passages_file.open()),
            "train": len(train),
            "dev": len(dev),
            "ingest_s": round(ingest_s, 1),
            "bm25_recall_at_5": base.recall_at(5, "bm25"),
            "bm25_recall_at_5_ci": base.recall_ci["bm25"]["5"],
            "modes": measured,
        }
    )
    for run in dict.fromkeys(RUN_MODES[m] for m in modes if m in RUN_MODES):
        request = run_request(run, domain, args)
        started = time.perf_counter()
        info = adapt(
            store, config, request, root / "work", progress=not args.no_progress, workspace=workspace
        )
        seconds = time.perf_counter() - started
        if info.error:
            raise SystemExit(f"{domain} {run} run failed: {info.error}")
        events, _ = RunStore(store).events(info.id)
        steps = [e for e in events if e["kind"] == "step"]
        data = next((e for e in events if e["kind"] == "data"), {})
        run_result = {
            "run_id": info.id,
            "seconds": round(seconds, 1),
            "total_steps": info.total_steps,
            "retriever_steps": data.get("retriever_steps"),
            "data": {k: data.get(k) for k in ("examples", "generated", "pairs", "sentences")},
            "first_loss": steps[0]["loss"] if steps else None,
            "last_loss": steps[-1]["loss"] if steps else None,
            "hyperparameters": request.hyperparameters.model_dump(exclude_none=True, exclude={"lora"}),
        }
        print(f"{domain} {run}: {run_result}", flush=True)
        entry = save({"runs": {run: run_result}})
        for mode in [m for m in modes if RUN_MODES.get(m) == run]:
            report = evaluated(info.adapter_version, closed_book=mode == "closed_book_ft")
            entry = save({"modes": {mode: figures(report, base)}})
            shown = {k: v for k, v in entry["modes"][mode].items() if k != "samples"}
            print(f"{domain} {mode}: {json.dumps(shown)}", flush=True)
    shutil.rmtree(root, ignore_errors=True)
    return entry


def plot(domains: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [d for d in DOMAINS if d in domains]
    metrics = [
        ("recall_at_5", "dense recall@5"),
        ("hybrid_recall_at_5", "hybrid recall@5"),
        ("f1", "F1"),
        ("em", "EM"),
    ]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.8), sharey=True)
    width = 0.8 / len(MODES)
    for ax, (metric, label) in zip(axes, metrics):
        for m, mode in enumerate(MODES):
            xs, values, errors = [], [], [[], []]
            for d, domain in enumerate(names):
                entry = domains[domain]["modes"].get(mode, {})
                value = entry.get(metric)
                if value is None:
                    continue
                ci = entry.get(f"{metric}_ci") or [value, value]
                xs.append(d + (m - (len(MODES) - 1) / 2) * width)
                values.append(value)
                errors[0].append(value - ci[0])
                errors[1].append(ci[1] - value)
            if values:
                # a mode keeps its color in every panel, even where another has no value
                ax.bar(xs, values, width, yerr=errors, capsize=2, label=mode, color=f"C{m}")
        for d, domain in enumerate(names):
            if metric.endswith("recall_at_5"):
                ax.hlines(
                    domains[domain]["bm25_recall_at_5"],
                    d - 0.45,
                    d + 0.45,
                    colors="black",
                    linestyles="dashed",
                    linewidth=1,
                )
        ax.set_xticks(range(len(names)), names)
        ax.set_title(label + (" (dashed: BM25)" if metric.endswith("recall_at_5") else ""), fontsize=9)
        ax.set_ylim(0, 1)
    handles = {label: handle for ax in axes for handle, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), fontsize=8, loc="lower center", ncol=len(handles))
    fig.suptitle(
        "Dev split, full knowledge bases, embedded default backbone; 95% bootstrap intervals", fontsize=9
    )
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--domain", action="append", choices=DOMAINS, help="repeatable; default: all three")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated of {', '.join(MODES)}")
    parser.add_argument("--answered", type=int, default=100, help="dev questions answered for EM/F1")
    parser.add_argument("--top-k", type=int, default=3, help="passages answers are generated from")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--steps", type=int, default=80, help="joint-phase steps of every run")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--train-top-k", type=int, default=2, help="passages per example in the joint phase")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--retriever-epochs", type=float, default=2.0)
    parser.add_argument("--retriever-batch-size", type=int, default=32)
    parser.add_argument("--refresh-every", type=int, default=30)
    parser.add_argument(
        "--generated-passages", type=int, default=200, help="passages_only: questions written"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/ragadapt-bench-knowledge"))
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "ragadapt")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown modes {unknown}")
    import matplotlib  # noqa: F401  (pip install -e '.[bench]'): fail now, not after the runs
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    config = embedded_default_config(cache_dir=args.cache_dir)
    backbone = Backbone.load(config)
    path = RESULTS_DIR / "knowledge.json"
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings.update(
        {
            "backbone": "embedded default: all-MiniLM-L6-v2 (both encoders) + SmolLM2-135M-Instruct",
            "dtype": str(backbone.dtype),
            "torch_threads": torch.get_num_threads(),
        }
    )
    for domain in args.domain or DOMAINS:
        piece_started = time.perf_counter()

        def save(update: dict, domain: str = domain) -> dict:
            with _locked(path.with_suffix(".lock")):  # pieces may run side by side, one per core
                data = json.loads(path.read_text()) if path.exists() else {"benchmark": "knowledge"}
                entry = data.setdefault("domains", {}).setdefault(
                    domain, {"modes": {}, "runs": {}, "pieces": []}
                )
                for key, value in update.items():
                    if key in ("modes", "runs"):
                        entry[key].update(value)
                    else:
                        entry[key] = value
                path.write_text(json.dumps(data, indent=2) + "\n")
                return entry

        run_domain(domain, modes, args, backbone, config, args.work_dir, save)
        minutes = round((time.perf_counter() - piece_started) / 60, 1)
        with _locked(path.with_suffix(".lock")):
            domains = json.loads(path.read_text())["domains"]
            entry = domains[domain]
            entry["pieces"].append({**settings, "modes": modes, "minutes": minutes})
            note = {"note": "the settings of each piece (one domain, some modes) are in domains.<d>.pieces"}
            record("knowledge", note, domains, _summary(domain, entry, modes), results_key="domains")
            plot(domains, RESULTS_DIR / "knowledge.png")
        print(f"wrote {path} and {RESULTS_DIR / 'knowledge.png'} ({domain})")


@contextlib.contextmanager
def _locked(path: Path):
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _summary(domain: str, entry: dict, modes: list[str]) -> str:
    """The RESULTS.md line of one piece: dense r@5, hybrid r@5, F1 and EM of each mode it ran."""
    cells = []
    for mode in modes:
        m = entry["modes"][mode]
        values = (m.get(k) for k in ("recall_at_5", "hybrid_recall_at_5", "f1", "em"))
        cells.append(f"{mode} " + " ".join(f"{v:.3f}" if v is not None else "-" for v in values))
    piece = entry["pieces"][-1]
    return (
        f"{domain}, full knowledge base, dev split ({piece['minutes']} min, {piece['torch_threads']} "
        f"threads); dense r@5, hybrid r@5, F1, EM (BM25 r@5 {entry['bm25_recall_at_5']:.3f}): "
        + "; ".join(cells)
    )


if __name__ == "__main__":
    main()

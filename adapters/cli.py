"""`ragadapt adapt` and `ragadapt eval`: adaptation runs and evaluations without the server.

`adapt` records the run in the store like `POST /admin/adapt` does (same validation, same record, events
and checkpoints), but claims it for this process and executes it here with a progress bar; a run
interrupted here can be resumed with `--resume RUN_ID` (or by a server worker once its lease has run out).
`eval` prints one table comparing configurations of a domain on one QA split.

The service's CLI (`service/cli.py`) builds the store, backbone config and work directory from its settings
and calls `add_parsers` / the `cmd_*` functions; everything here is also callable from Python (benchmarks,
tests).
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from adapters.errors import InvalidRun
from adapters.execution import Workspace, execute
from adapters.lease import RunContext
from adapters.qa import QaSets, parse_qa_jsonl
from adapters.queue import claim, submit
from adapters.records import RunStore, owner_token
from adapters.spec import RunInfo, RunRequest, RunState
from backbone import COMPONENTS
from storage.store import ObjectStore

if TYPE_CHECKING:
    from adapters.evaluation import EvalReport
    from backbone import Backbone, BackboneConfig


def adapt(
    store: ObjectStore,
    backbone_config: BackboneConfig,
    request: RunRequest,
    work_dir: Path,
    *,
    progress: bool = True,
    lease_s: float = 120.0,
    workspace: Workspace | None = None,
) -> RunInfo:
    """Validate, record and execute one run in this process; returns its final RunInfo (failed runs too).

    `workspace` reuses an already loaded backbone across several runs (benchmarks)."""
    runs = RunStore(store)
    owner = owner_token(f"cli-{secrets.token_hex(4)}")
    record = submit(runs, request, owner=owner, lease_s=lease_s)
    return _execute_here(
        runs,
        record,
        owner,
        backbone_config,
        work_dir,
        progress=progress,
        lease_s=lease_s,
        workspace=workspace,
    )


def resume(
    store: ObjectStore,
    backbone_config: BackboneConfig,
    run_id: str,
    work_dir: Path,
    *,
    progress: bool = True,
    lease_s: float = 120.0,
) -> RunInfo:
    """Take over a queued run, or one whose worker is gone, and finish it here from its last checkpoint."""
    runs = RunStore(store)
    owner = owner_token(f"cli-{secrets.token_hex(4)}")
    record = claim(runs, run_id, owner, lease_s=lease_s, max_crashes=1_000_000)
    if record is None:
        current = runs.get(run_id)
        raise InvalidRun(
            f"run {run_id} is {current.state.value}"
            + (f" and held by {current.owner}" if current.state == RunState.RUNNING else "")
            + "; only a queued run or one whose worker is gone can be resumed"
        )
    return _execute_here(runs, record, owner, backbone_config, work_dir, progress=progress, lease_s=lease_s)


def _execute_here(
    runs: RunStore,
    record,
    owner: str,
    backbone_config,
    work_dir: Path,
    *,
    progress: bool,
    lease_s: float,
    workspace: Workspace | None = None,
) -> RunInfo:
    from tqdm.auto import tqdm

    bar = tqdm(
        total=record.total_steps,
        desc=f"{record.domain} {record.mode}",
        unit="step",
        disable=not progress,
        initial=record.checkpoint_step or 0,
    )

    def on_progress(stage: str, done: int, total: int, latest: dict) -> None:
        if stage == "training" and done:
            bar.set_description(f"{record.domain} {record.mode} training")
            bar.update(done - bar.n)
            if latest:
                bar.set_postfix(loss=f"{latest['loss']:.3f}", ex_s=f"{latest['examples_per_s']:.1f}")
        else:
            bar.set_description(
                f"{record.domain} {record.mode} {stage}" + (f" {done}/{total}" if total else "")
            )

    owned = workspace is None
    workspace = workspace or Workspace(backbone_config, Path(work_dir) / f"cli-{owner.rsplit('/', 1)[-1]}")
    ctx = RunContext(runs, record, owner, lease_s=lease_s, on_progress=on_progress)
    try:
        execute(ctx, workspace)
    except Exception:  # the outcome (cancelled, failed and why) is in the run record the caller gets
        pass
    finally:
        bar.close()
        if owned:
            shutil.rmtree(workspace.work_dir, ignore_errors=True)
    return runs.get(record.id).info()


# --- eval ---------------------------------------------------------------------------------------------------


def evaluate_modes(
    store: ObjectStore,
    backbone: Backbone,
    domain: str,
    *,
    split: str = "dev",
    modes: Sequence[str] = ("base", "generator_only", "end2end"),
    top_k: int = 5,
    max_questions: int | None = None,
    max_new_tokens: int = 32,
    work_dir: Path,
    progress: bool = True,
) -> list[tuple[str, EvalReport]]:
    """Evaluate configurations of `domain` on `split` of its QA set, one report per mode.

    A mode is `base` (the base backbone over a base-encoder index), `live` (what the domain serves), a run
    mode (`end2end`, `generator_only`, `retriever_only`: the adapter version of the domain's newest
    succeeded run of that mode) or an adapter version id. Each adapter version is evaluated over the index
    published with it.
    """
    from tqdm.auto import tqdm

    from adapters.evaluation import evaluate
    from adapters.registry import AdapterRegistry
    from indexing.publish import base_index_version
    from indexing.versions import IndexVersions
    from storage.registry import DomainRegistry

    domains = DomainRegistry(store)
    versions = IndexVersions(domains, Path(work_dir) / "index-cache")
    adapters = AdapterRegistry(store)
    qa = QaSets(store)
    manifest = qa.latest(domain)
    if manifest is None:
        raise InvalidRun(f"domain {domain!r} has no QA set")
    examples = qa.load(domain, manifest.version).split(split)
    if not examples:
        raise InvalidRun(f"the QA set of {domain!r} has no {split!r} examples")
    runs = (
        RunStore(store).list()
        if any(m in ("end2end", "generator_only", "retriever_only") for m in modes)
        else []
    )

    reports = []
    for mode in modes:
        adapter_version, index_version = _resolve_mode(mode, domain, domains, adapters, runs)
        if adapter_version is None and index_version is None:
            index_version = base_index_version(backbone, versions, domain, work_dir=Path(work_dir))
        key = None
        if adapter_version is not None:
            key = adapters.attach(backbone, adapters.ref(domain, adapter_version), Path(work_dir))
        try:
            handle = versions.open(
                domain, index_version, embedding_dim=backbone.embedding_dim, fingerprint=backbone.fingerprint
            )
            total = len(examples) + min(len(examples), max_questions or len(examples))
            with tqdm(total=total, desc=f"eval {domain} {mode}", disable=not progress) as bar:
                report = evaluate(
                    backbone,
                    key,
                    handle,
                    examples,
                    top_k=top_k,
                    max_new_tokens=max_new_tokens,
                    max_questions=max_questions,
                    adapter_version=adapter_version,
                    progress=lambda done, _total: bar.update(done - bar.n),
                )
        finally:
            if key is not None:
                backbone.remove_adapter_set(key)
        reports.append((mode, report))
    return reports


def _resolve_mode(mode: str, domain: str, domains, adapters, runs) -> tuple[str | None, str | None]:
    """(adapter version, index version) for a mode; (None, None) for the base backbone."""
    if mode == "base":
        return None, None
    if mode == "live":
        pointer = domains.live(domain)
        return pointer.adapter_version, pointer.index_version
    if mode in ("end2end", "generator_only", "retriever_only"):
        done = [
            r
            for r in runs
            if r.domain == domain and r.mode == mode and r.state == RunState.SUCCEEDED and r.adapter_version
        ]
        if not done:
            raise InvalidRun(f"domain {domain!r} has no succeeded {mode} run to evaluate")
        return done[0].adapter_version, done[0].index_version
    manifest = adapters.get(domain, mode)
    return mode, manifest.metadata.get("index_version") or domains.live(domain).index_version


# --- argparse glue ------------------------------------------------------------------------------------------


def add_parsers(subparsers) -> None:
    """Add `adapt` and `eval` to a `ragadapt` subparsers object; the caller dispatches to
    cmd_adapt/cmd_eval."""
    adapt_parser = subparsers.add_parser("adapt", help="run a domain adaptation (RAG End2End + LoRA) here")
    adapt_parser.add_argument("--domain", required=True)
    adapt_parser.add_argument(
        "--mode", choices=["end2end", "generator_only", "retriever_only"], default="end2end"
    )
    adapt_parser.add_argument("--promote", choices=["never", "if_better", "always"], default="if_better")
    data = adapt_parser.add_mutually_exclusive_group()
    data.add_argument("--train-split", default=None, help="split of the domain's QA set (default: train)")
    data.add_argument("--train-uri", default=None, help="store key of a QA JSONL file")
    data.add_argument("--train-file", type=Path, default=None, help="local QA JSONL file (sent inline)")
    adapt_parser.add_argument(
        "--eval-split", default="dev", help="split of the domain's QA set ('' for none)"
    )
    adapt_parser.add_argument(
        "--request",
        type=Path,
        default=None,
        help="a JSON RunRequest; the flags above then only fill what it leaves out",
    )
    adapt_parser.add_argument(
        "--resume", default=None, metavar="RUN_ID", help="finish an interrupted run here"
    )
    for flag, kind in (
        ("steps", int),
        ("epochs", float),
        ("lr", float),
        ("batch-size", int),
        ("grad-accumulation", int),
        ("top-k", int),
        ("index-refresh-every", int),
        ("reconstruction-ratio", float),
        ("seed", int),
        ("checkpoint-every", int),
        ("warmup-steps", int),
        ("eval-max-questions", int),
        ("retriever-steps", int),
        ("retriever-epochs", float),
        ("retriever-batch-size", int),
        ("retriever-lr", float),
        ("temperature", float),
        ("hard-negatives", int),
        ("marginal-weight", float),
        ("contrastive-weight", float),
        ("lm-supervision-weight", float),
        ("gold-passage-prob", float),
    ):
        adapt_parser.add_argument(f"--{flag}", type=kind, default=None)
    adapt_parser.add_argument(
        "--query-side-only",
        action="store_true",
        default=None,
        help="LoRA on the question encoder only: no re-indexing",
    )
    adapt_parser.add_argument("--promote-metric", choices=["recall@5", "f1"], default=None)
    synthetic = adapt_parser.add_argument_group("synthetic training data from the domain's passages")
    synthetic.add_argument("--no-synthetic", action="store_true", help="train on the QA examples alone")
    synthetic.add_argument("--no-ict", action="store_true", help="no inverse-cloze pairs")
    synthetic.add_argument(
        "--generate-questions",
        type=int,
        default=None,
        metavar="PASSAGES",
        help="generate questions about this many passages (round-trip filtered, cached)",
    )
    synthetic.add_argument(
        "--synthetic-ratio", type=float, default=None, help="share of QA rows drawn from generated questions"
    )
    synthetic.add_argument(
        "--passages-only", action="store_true", help="train on synthetic data alone, no QA examples"
    )
    adapt_parser.add_argument("--lora-r", type=int, default=None, help="LoRA rank of all three components")
    adapt_parser.add_argument("--lora-alpha", type=int, default=None)
    adapt_parser.add_argument("--init", choices=["live", "base"], default=None)
    adapt_parser.add_argument("--activation-checkpointing", action="store_true", default=None)
    adapt_parser.add_argument("--quantize-generator", choices=["none", "4bit"], default=None)
    adapt_parser.add_argument("--no-progress", action="store_true")

    eval_parser = subparsers.add_parser("eval", help="compare base, generator-only and End2End on a QA split")
    eval_parser.add_argument("--domain", required=True)
    eval_parser.add_argument("--split", default="dev")
    eval_parser.add_argument(
        "--modes",
        default="base,generator_only,end2end",
        help="comma-separated: base, live, end2end, generator_only, retriever_only or adapter versions",
    )
    eval_parser.add_argument("--top-k", type=int, default=5)
    eval_parser.add_argument("--max-questions", type=int, default=None)
    eval_parser.add_argument("--max-new-tokens", type=int, default=32)
    eval_parser.add_argument("--json", action="store_true", help="print the reports as JSON instead")
    eval_parser.add_argument("--no-progress", action="store_true")


def request_from_args(args: argparse.Namespace) -> RunRequest:
    """A RunRequest from `ragadapt adapt` flags (over `--request` when given)."""
    body = json.loads(Path(args.request).read_text()) if args.request else {}
    body.setdefault("domain", args.domain)
    body.setdefault("mode", args.mode)
    body.setdefault("promote", args.promote)
    synthetic_default = {} if not args.no_synthetic else None
    if args.train_file is not None:
        body["train"] = {
            "examples": [e.to_dict() for e in parse_qa_jsonl(Path(args.train_file).read_bytes())],
            "synthetic": synthetic_default,
        }
    elif args.train_uri is not None:
        body["train"] = {"uri": args.train_uri, "synthetic": synthetic_default}
    elif args.train_split is not None:
        body["train"] = {"split": args.train_split, "synthetic": synthetic_default}
    # From the flags, synthetic data comes by default, as in a request that leaves `train` out.
    train = body.setdefault("train", {"split": "train", "synthetic": synthetic_default})
    if args.passages_only:
        for name in ("split", "uri", "examples"):
            train.pop(name, None)
    shaped = args.no_ict or args.generate_questions is not None or args.synthetic_ratio is not None
    if args.passages_only or shaped:
        synthetic = train.get("synthetic") or {}
        train["synthetic"] = synthetic
        if args.no_ict:
            synthetic["ict"] = None
        if args.generate_questions is not None:
            synthetic.setdefault("generated", {})["max_passages"] = args.generate_questions
        if args.synthetic_ratio is not None:
            synthetic["ratio"] = args.synthetic_ratio
    if args.promote_metric is not None:
        body["promote_metric"] = args.promote_metric
    if "evaluation" not in body:
        body["evaluation"] = {"split": args.eval_split} if args.eval_split else None
    hp = body.setdefault("hyperparameters", {})
    for name in (
        "steps",
        "epochs",
        "lr",
        "batch_size",
        "grad_accumulation",
        "top_k",
        "index_refresh_every",
        "reconstruction_ratio",
        "seed",
        "checkpoint_every",
        "warmup_steps",
        "eval_max_questions",
        "init",
        "activation_checkpointing",
        "quantize_generator",
        "retriever_steps",
        "retriever_epochs",
        "retriever_batch_size",
        "retriever_lr",
        "temperature",
        "hard_negatives",
        "marginal_weight",
        "contrastive_weight",
        "lm_supervision_weight",
        "gold_passage_prob",
        "query_side_only",
    ):
        value = getattr(args, name)
        if value is not None:
            hp[name] = value
    if args.lora_r is not None or args.lora_alpha is not None:
        spec = {k: v for k, v in (("r", args.lora_r), ("alpha", args.lora_alpha)) if v is not None}
        hp["lora"] = dict.fromkeys(COMPONENTS, spec)
    return RunRequest.model_validate(body)


def cmd_adapt(
    args: argparse.Namespace, store: ObjectStore, backbone_config: BackboneConfig, work_dir: Path
) -> int:
    progress = not args.no_progress
    if args.resume:
        info = resume(store, backbone_config, args.resume, work_dir, progress=progress)
    else:
        info = adapt(store, backbone_config, request_from_args(args), work_dir, progress=progress)
    print(info.model_dump_json(indent=2))
    return 0 if info.state == RunState.SUCCEEDED else 1


def cmd_eval(args: argparse.Namespace, store: ObjectStore, backbone: Backbone, work_dir: Path) -> int:
    from adapters.evaluation import format_differences, format_table

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    reports = evaluate_modes(
        store,
        backbone,
        args.domain,
        split=args.split,
        modes=modes,
        top_k=args.top_k,
        max_questions=args.max_questions,
        max_new_tokens=args.max_new_tokens,
        work_dir=work_dir,
        progress=not args.no_progress,
    )
    if args.json:
        print(json.dumps({mode: report.to_dict() for mode, report in reports}, indent=2))
    else:
        print(format_table(reports))
        if len(reports) > 1:
            print(f"\nagainst {reports[0][0]}, paired over the same questions:")
            print(format_differences(reports[0][1], reports[1:]))
    return 0

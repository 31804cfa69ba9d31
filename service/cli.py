"""`ragadapt` command line: one obvious entry point per job."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path

import torch


def cmd_ask(args: argparse.Namespace) -> int:
    """Answer one question over a corpus file with brute-force dense retrieval (no index needed); the corpus
    is read and chunked as `ingest` reads it."""
    from backbone import Backbone
    from indexing import EmptyCorpus, MalformedPassages, load_corpus

    from .settings import Settings

    settings = Settings()
    try:  # read and checked before the backbone loads
        passages = load_corpus(Path(args.passages))
    except (MalformedPassages, EmptyCorpus) as exc:
        raise SystemExit(str(exc)) from None
    backbone = Backbone.load(settings.backbone.config())
    with torch.inference_mode():
        embeddings = torch.cat(
            [backbone.encode_passages(passages[i : i + 64]) for i in range(0, len(passages), 64)]
        )  # [n, dim]
        scores = (backbone.encode_questions([args.question]) @ embeddings.T)[0]  # [n]
    top = scores.topk(min(args.top_k, len(passages)))
    hits = [passages[i] for i in top.indices.tolist()]
    answer = backbone.answer(
        [args.question], [hits], [top.values.tolist()], max_new_tokens=args.max_new_tokens
    )[0]
    print(answer.text)
    for support in answer.supporting:
        print(f"  [{support.passage.id}] {support.passage.title} (score {support.score:.3f})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the HTTP API with settings from RAGADAPT_* (the demo domain is built on first start)."""
    import uvicorn

    from .app import create_app
    from .settings import Settings

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = Settings()
    if overrides:
        settings = Settings(server={**settings.server.model_dump(), **overrides})
    _configure_logging(args.log_level, settings.server.log_json)
    uvicorn.run(
        create_app(settings),
        host=settings.server.host,
        port=settings.server.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=30,
    )
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    """Ingest a corpus into a domain of the configured store and make its new index live (progress on stderr).

    A domain that already serves an adapter gets its index encoded with that adapter's passage encoder."""
    import shutil
    import tempfile

    from adapters import AdapterRegistry
    from adapters.qa import QaSets, parse_qa_jsonl
    from backbone import Backbone
    from indexing import IndexConfig, ingest
    from storage import DomainNotFound, DomainRegistry, open_store

    from .settings import Settings

    settings = Settings()
    store = open_store(settings.store_config)
    qa = parse_qa_jsonl(Path(args.qa).read_bytes()) if args.qa else []  # checked before anything is written
    backbone = Backbone.load(settings.backbone.config())
    scratch = Path(tempfile.mkdtemp(prefix="ragadapt-ingest-"))
    try:
        adapter_dir, adapter_version = None, None
        with contextlib.suppress(DomainNotFound):
            adapter_version = DomainRegistry(store).live(args.domain).adapter_version
        if adapter_version is not None:
            adapter_dir = scratch / "adapter"
            adapters = AdapterRegistry(store)
            adapters.fetch(
                adapters.ref(args.domain, adapter_version),
                adapter_dir,
                expected_fingerprint=backbone.fingerprint,
            )
        result = ingest(
            args.domain,
            Path(args.passages),
            store,
            backbone.config,
            backbone=backbone,
            cache_dir=settings.cache_dir / "indexes",
            index=IndexConfig(retrieval=args.retrieval),
            adapter_dir=adapter_dir,
            adapter_version=adapter_version,
            description=args.description,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if qa:
        QaSets(store).publish(args.domain, qa, source=str(args.qa))
    print(
        json.dumps(
            {
                "domain": result.domain,
                "passages": result.passage_count,
                "passages_version": result.passages_version,
                "index_version": result.index_version,
                "adapter_version": adapter_version,
                "qa_examples": len(qa),
                "seconds": result.seconds,
            }
        )
    )
    return 0


def cmd_adapt(args: argparse.Namespace) -> int:
    """An adaptation run in this process (recorded in the store like POST /admin/adapt)."""
    from adapters.cli import cmd_adapt as adapt
    from storage import open_store

    from .settings import Settings

    settings = Settings()
    store = open_store(settings.store_config)
    return adapt(args, store, settings.backbone.config(), settings.cache_dir / "runs")


def cmd_eval(args: argparse.Namespace) -> int:
    """Compare the base backbone and adapters of a domain on one QA split."""
    from adapters.cli import cmd_eval as evaluate
    from backbone import Backbone
    from storage import open_store

    from .settings import Settings

    settings = Settings()
    backbone = Backbone.load(settings.backbone.config())
    return evaluate(args, open_store(settings.store_config), backbone, settings.cache_dir / "eval")


def cmd_gc(args: argparse.Namespace) -> int:
    """Delete old versions and what faults left in the store (prints what, as JSON); a dry run without
    --apply. A server's local scratch space is swept by its own POST /admin/gc, which knows what it uses."""
    from storage import open_store

    from .gc import collect
    from .settings import Settings

    store = open_store(Settings().store_config)
    report = collect(store, keep_last=args.keep_last, dry_run=not args.apply, domains=args.domain or None)
    print(report.model_dump_json(indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from adapters.cli import add_parsers

    parser = argparse.ArgumentParser(
        prog="ragadapt",
        description=__doc__,
        epilog="Settings come from RAGADAPT_* environment variables "
        "(see service/settings.py), e.g. RAGADAPT_STORE__BACKEND=s3.",
    )
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the HTTP API")
    serve.add_argument("--host", default=None, help="overrides RAGADAPT_SERVER__HOST")
    serve.add_argument("--port", type=int, default=None, help="overrides RAGADAPT_SERVER__PORT")
    serve.set_defaults(func=cmd_serve)

    ingest = sub.add_parser("ingest", help="ingest passages into a domain and make its index live")
    ingest.add_argument("--domain", required=True)
    ingest.add_argument("--passages", required=True, help="JSONL (id, title, text), .txt/.md, or a directory")
    ingest.add_argument("--qa", default=None, help="JSONL: question, answers, passage_ids?, split? a line")
    ingest.add_argument("--retrieval", choices=["dense", "bm25", "hybrid"], default="dense")
    ingest.add_argument("--description", default="")
    ingest.set_defaults(func=cmd_ingest)

    ask = sub.add_parser("ask", help="answer a question over a passages JSONL file")
    ask.add_argument("--passages", required=True, help="JSONL (id, title, text), .txt/.md, or a directory")
    ask.add_argument("--question", required=True)
    ask.add_argument("--top-k", type=int, default=5)
    ask.add_argument("--max-new-tokens", type=int, default=32)
    ask.set_defaults(func=cmd_ask)

    gc = sub.add_parser("gc", help="delete old versions and what faults left behind (dry run by default)")
    gc.add_argument("--apply", action="store_true", help="delete (without it, only say what would go)")
    gc.add_argument("--keep-last", type=int, default=5, help="newest versions of each kind kept per domain")
    gc.add_argument("--domain", action="append", help="only this domain's versions (repeatable)")
    gc.set_defaults(func=cmd_gc)

    add_parsers(sub)
    sub.choices["adapt"].set_defaults(func=cmd_adapt)
    sub.choices["eval"].set_defaults(func=cmd_eval)
    return parser


def _configure_logging(level: str, as_json: bool) -> None:
    """Plain or JSON lines on stderr; JSON lines carry the logger, level, message and any extra ids."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _JsonFormatter() if as_json else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class _JsonFormatter(logging.Formatter):
    _STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in self._STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    if logging.getLogger().level > logging.INFO:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""`ragadapt` command line: one obvious entry point per job."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch


def _read_passages(path: Path):
    from backbone import Passage

    passages = []
    with path.open() as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                passages.append(Passage(str(row["id"]), row.get("title", ""), row["text"]))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise SystemExit(f"{path}:{number}: not a passage object with id and text ({exc})") from None
    if not passages:
        raise SystemExit(f"{path}: no passages")
    return passages


def cmd_ask(args: argparse.Namespace) -> int:
    """Answer one question over a passages file with brute-force dense retrieval (no index needed)."""
    from backbone import Backbone

    from .settings import Settings

    settings = Settings()
    backbone = Backbone.load(settings.backbone.config())
    passages = _read_passages(Path(args.passages))
    with torch.inference_mode():
        embeddings = torch.cat([
            backbone.encode_passages(passages[i : i + 64]) for i in range(0, len(passages), 64)
        ])  # [n, dim]
        scores = (backbone.encode_questions([args.question]) @ embeddings.T)[0]  # [n]
    top = scores.topk(min(args.top_k, len(passages)))
    hits = [passages[i] for i in top.indices.tolist()]
    answer = backbone.answer([args.question], [hits], [top.values.tolist()], max_new_tokens=args.max_new_tokens)[0]
    print(answer.text)
    for support in answer.supporting:
        print(f"  [{support.passage.id}] {support.passage.title} (score {support.score:.3f})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ragadapt", description=__doc__)
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    ask = sub.add_parser("ask", help="answer a question over a passages JSONL file")
    ask.add_argument("--passages", required=True, help="JSONL with id, title, text per line")
    ask.add_argument("--question", required=True)
    ask.add_argument("--top-k", type=int, default=5)
    ask.add_argument("--max-new-tokens", type=int, default=32)
    ask.set_defaults(func=cmd_ask)
    return parser


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

"""Chunked prefill on the embedded default: how long the answers in flight wait for their next token while a
long prompt joins, with and without chunking. Writes results, never asserts.

    .venv/bin/python benchmarks/bench_prefill.py [--chunks 0 64 128 256] [--prompt-tokens 2000]

`--rows` RAG rows (a covid dev question over its gold passage, as the service builds them) decode; after
`--steady-steps` steps a prompt of `--prompt-tokens` tokens (covid passages, then a question) joins. The
inter-token latency (ITL) of the rows in flight is the time from one step's end to the next's, the newcomer's
prefill included where it runs between them (as the model worker calls `add` between steps). Reported per
chunk size (0: prefilled at once): the steady step time, ITL p99 and max over the steps from the join until
the newcomer's first token and `--after` steps more, and the newcomer's time to first token. Target: ITL p99
with chunking <= 2x the steady step time. Each setting runs `--rounds` times, alternating; the best round
(least disturbed by other work) counts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from backbone import Backbone, Passage, embedded_default_config  # noqa: E402
from backbone.generator import Prompt  # noqa: E402

from reporting import record  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "covid"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def prompts(backbone: Backbone, rows: int, long_tokens: int) -> tuple[list[Prompt], Prompt]:
    """`rows` RAG prompts of covid dev questions over their gold passages, and one long prompt."""
    passages = {p["id"]: p for p in _rows(DATA / "passages.jsonl")}
    qa = [q for q in _rows(DATA / "qa.jsonl") if q["split"] == "dev" and q["passage_ids"]][:rows]
    generator = backbone.generator
    short = []
    for q in qa:
        p = passages[q["passage_ids"][0]]
        short.append(generator.source(q["question"], Passage(p["id"], p["title"], p["text"])))
    text, tokenizer = "", generator.tokenizer
    for p in passages.values():
        if len(tokenizer(text, add_special_tokens=False).input_ids) >= long_tokens:
            break
        text += p["text"] + "\n"
    ids = tokenizer(text, add_special_tokens=False).input_ids[:long_tokens]
    long = Prompt(tokenizer.decode(ids), "\nQuestion: what do these passages say about masks?\nAnswer:")
    return short, long


def run(backbone: Backbone, chunk: int, short: list[Prompt], long: Prompt, args) -> dict:
    decoding = backbone.generator.decoding(None, chunk_tokens=chunk)
    with torch.inference_mode():
        decoding.add(short, ["__base__"] * len(short), [10**6] * len(short))
        steady = []
        last = time.perf_counter()
        for _ in range(args.steady_steps):
            decoding.step()
            now = time.perf_counter()
            steady.append(now - last)
            last = now
        joined = time.perf_counter()
        (ticket,) = decoding.add([long], ["__base__"], [10**6])
        gaps, first_token, after = [], None, 0
        while after < args.after:
            decoding.step()
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
            if first_token is None and not decoding.prefilling:
                first_token = now - joined
            elif first_token is not None:
                after += 1
        decoding.drop(set(range(ticket + 1)))
    steady_s = statistics.median(steady[3:])
    return {
        "steady_step_ms": round(1000 * steady_s, 1),
        "itl_p99_ms": round(1000 * float(np.percentile(gaps, 99)), 1),
        "itl_max_ms": round(1000 * max(gaps), 1),
        "itl_p99_over_steady": round(float(np.percentile(gaps, 99)) / steady_s, 2),
        "steps_to_first_token": len(gaps) - args.after,
        "newcomer_first_token_ms": round(1000 * first_token, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 16, 32, 64, 128, 256])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--steady-steps", type=int, default=15)
    parser.add_argument("--after", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "auto"], default="auto")
    args = parser.parse_args()

    backbone = Backbone.load(embedded_default_config(dtype=args.dtype))
    backbone.generator.eos_ids = []  # rows decode until dropped: the batch stays as it is
    short, long = prompts(backbone, args.rows, args.prompt_tokens)
    rounds: dict[int, list[dict]] = {chunk: [] for chunk in args.chunks}
    for number in range(args.rounds):
        for chunk in args.chunks:
            result = run(backbone, chunk, short, long, args)
            rounds[chunk].append(result)
            print(f"  round {number + 1} chunk {chunk}: {result}", flush=True)
    best = {str(chunk): min(results, key=lambda r: r["itl_p99_ms"]) for chunk, results in rounds.items()}
    lengths = [sum(map(len, ids)) for ids in zip(*backbone.generator.prompt_ids(short))]
    settings = {
        "rows_in_flight": args.rows,
        "in_flight_prompt_tokens_mean": round(statistics.mean(lengths)),
        "joining_prompt_tokens": sum(map(len, (x[0] for x in backbone.generator.prompt_ids([long])))),
        "chunks": args.chunks,
        "rounds": args.rounds,
        "dtype": str(backbone.dtype),
        "threads": torch.get_num_threads(),
    }
    summary = "; ".join(
        f"chunk {chunk or 'off'}: ITL p99 {r['itl_p99_ms']} ms = {r['itl_p99_over_steady']}x steady "
        f"{r['steady_step_ms']} ms, newcomer first token {r['newcomer_first_token_ms']} ms"
        for chunk, r in best.items()
    )
    record(
        "prefill_chunked",
        settings,
        {"best": best, "rounds": {str(k): v for k, v in rounds.items()}},
        f"{args.rows} rows decoding, a {settings['joining_prompt_tokens']}-token prompt joins "
        f"(target: ITL p99 <= 2x steady with chunking): {summary}",
    )


if __name__ == "__main__":
    main()

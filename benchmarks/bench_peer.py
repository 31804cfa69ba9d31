"""A CPU peer: the embedded default's SmolLM2-135M GGUF file served by llama.cpp against ragadapt's decoding
on the same cores and the same token ids. Writes results, never asserts.

    .venv/bin/pip install -e '.[peer]'     # llama-cpp-python builds from source (about 12 minutes, 2 cores)
    # Where the CPU advertises AMX but a VM does not enable it, llama.cpp's AMX kernels crash: build without
    # CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
    #   -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF
    #   -DGGML_AMX_BF16=OFF" (as here)
    .venv/bin/python benchmarks/bench_peer.py [--batches 1 4 8 16] [--quality 100]

Contenders, each on `--threads` threads and run one after the other (never side by side):
- llama.cpp (llama-cpp-python's low-level API, `peer_llama_cpp.py`, in a process of its own) on the GGUF file
  itself (Q4_1 layers, 8-bit head);
- ragadapt's `Decoding` in bfloat16 (what `dtype: auto` picks on these cores), with `weight_only: none` and
  `int4` (packed int4 copies for forwards of at most 4 rows, the very weights the file holds).

Prompt: a RAG prompt of `--prompt-tokens` tokens (covid passages, then a question) in the generator's own
template, tokenized once by ragadapt's tokenizer; both engines get those ids. Per batch size B (B copies of
the prompt, each its own sequence): prefill tokens/s (B prompts in one call: one llama_decode with B
sequences, one `Decoding.add`), and decode tokens/s over `--tokens` greedy steps of all B rows (one
llama_decode or one `Decoding.step` per token). llama-cpp-python's own server decodes one sequence at a
time; its low-level batch API is what llama.cpp's server uses for parallel slots, so that is measured here.

`--quality N`: the greedy answers to N covid and finance dev questions (one gold passage each, 32 tokens, one
row at a time: the int4 kernels' case) in bfloat16 with and without int4, scored by token F1 against the gold
answers, with a paired bootstrap 95% CI of the difference.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from backbone import Backbone, Passage, embedded_default_config  # noqa: E402
from backbone.generator import Prompt  # noqa: E402

from reporting import record  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def rag_prompt(backbone: Backbone, tokens: int) -> str:
    """A prompt in the generator's template over covid passages, about `tokens` ids long (the backbone must
    clip passages to no fewer tokens)."""
    generator = backbone.generator
    question = "What do these passages say about masks?"
    text, prompt = "", None
    for p in _rows(DATA / "covid" / "passages.jsonl"):
        candidate = generator.source(question, Passage("x", "covid", text + p["text"] + "\n"))
        if len(_ids(backbone, candidate.text)) > tokens:
            break
        text, prompt = text + p["text"] + "\n", candidate
    return prompt.text


def _ids(backbone: Backbone, text: str) -> list[int]:
    return backbone.generator.prompt_ids([Prompt("", text)])[1][0]


def run_llama_cpp(args, gguf: Path, ids: list[int], rows: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) from llama.cpp in a process of its own (peer_llama_cpp.py)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(ids, f)
        f.flush()
        script = Path(__file__).with_name("peer_llama_cpp.py")
        options = ["--batches", str(rows), "--tokens", str(args.tokens), "--threads", str(args.threads)]
        out = subprocess.run(
            [sys.executable, str(script), str(gguf), f.name, *options],
            capture_output=True,
            text=True,
            check=True,
        )
    return tuple(json.loads(out.stdout.strip().splitlines()[-1])[str(rows)])


def run_ours(backbone: Backbone, text: str, rows: int, steps: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of `steps` greedy tokens for `rows` rows of `text`."""
    decoding = backbone.generator.decoding(None)
    prompt = Prompt("", text)
    with torch.inference_mode():
        started = time.perf_counter()
        decoding.add([prompt] * rows, ["__base__"] * rows, [steps] * rows)
        prefill = time.perf_counter() - started
        started = time.perf_counter()
        done = {}
        while len(decoding):
            done.update(decoding.step())
        decode = time.perf_counter() - started
    return prefill, decode


def speed(args, engines: dict, tokens: int) -> dict:
    results: dict[str, dict] = {name: {} for name in engines}
    for number in range(args.rounds):
        for rows in args.batches:
            for name, engine in engines.items():
                prefill, decode = engine(rows, args.tokens)
                entry = {
                    "prefill_tokens_per_s": round(rows * tokens / prefill, 1),
                    "decode_tokens_per_s": round(rows * args.tokens / decode, 1),
                }
                best = results[name].get(str(rows))
                if best is None:
                    results[name][str(rows)] = entry
                else:  # the best round of each number (the least disturbed by other work)
                    for key in entry:
                        best[key] = max(best[key], entry[key])
                print(f"  round {number + 1} {name} batch {rows}: {entry}", flush=True)
    return results


def f1(prediction: str, gold: str) -> float:
    p, g = prediction.lower().split(), gold.lower().split()
    common = sum(min(p.count(w), g.count(w)) for w in set(p))
    if not p or not g or not common:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def quality(args, backbones: dict[str, Backbone]) -> dict:
    """Token F1 of batch-1 answers to dev questions over their gold passage, per backbone."""
    rng = random.Random(0)
    questions = []
    for domain in ("covid", "finance"):
        passages = {p["id"]: p for p in _rows(DATA / domain / "passages.jsonl")}
        dev = [q for q in _rows(DATA / domain / "qa.jsonl") if q["split"] == "dev" and q["passage_ids"]]
        rng.shuffle(dev)
        questions += [(q, passages[q["passage_ids"][0]]) for q in dev[: args.quality // 2]]
    scores = {}
    for name, backbone in backbones.items():
        scores[name] = []
        for q, p in questions:
            passage = Passage(p["id"], p["title"], p["text"])
            answer = backbone.answer([q["question"]], [[passage]], [[1.0]], max_new_tokens=32)[0].text
            scores[name].append(max(f1(answer, gold) for gold in q["answers"]))
    names = list(backbones)
    diff = np.array(scores[names[1]]) - np.array(scores[names[0]])
    boot = np.random.default_rng(0).choice(diff, (2000, len(diff))).mean(axis=1)
    return {
        "questions": len(questions),
        "f1": {name: round(statistics.mean(values), 4) for name, values in scores.items()},
        f"f1_{names[1]}_minus_{names[0]}": round(float(diff.mean()), 4),
        "ci95": [round(float(np.percentile(boot, 2.5)), 4), round(float(np.percentile(boot, 97.5)), 4)],
        "questions_scored_the_same": sum(a == b for a, b in zip(scores[names[0]], scores[names[1]])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--prompt-tokens", type=int, default=781)
    parser.add_argument("--tokens", type=int, default=32, help="decoding steps")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quality", type=int, default=0, help="dev questions for the int4 F1 check")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    clip = {"max_passage_tokens": 4 * args.prompt_tokens}  # the long prompt's passages stay whole
    bf16 = Backbone.load(embedded_default_config(dtype="auto", **clip))
    int4 = Backbone.load(embedded_default_config(dtype="auto", weight_only="int4", **clip))
    # Both engines get the same ids: ragadapt tokenizes `text` to exactly `ids`.
    text = rag_prompt(bf16, args.prompt_tokens)
    ids = _ids(bf16, text)
    gguf = Path(bf16.config.generator) / bf16.config.generator_gguf_file
    engines = {
        "llama_cpp": lambda rows, steps: run_llama_cpp(args, gguf, ids, rows),
        "ragadapt_bf16": lambda rows, steps: run_ours(bf16, text, rows, steps),
        "ragadapt_int4": lambda rows, steps: run_ours(int4, text, rows, steps),
    }
    results = {"speed": speed(args, engines, len(ids))}
    if args.quality:
        results["quality_int4"] = quality(args, {"bf16": bf16, "int4": int4})
    speeds = results["speed"]
    b1, best = str(args.batches[0]), {}
    for name, rows in speeds.items():
        best[name] = max(rows.items(), key=lambda item: item[1]["decode_tokens_per_s"])
    results["best_batch"] = {name: {"batch": int(b), **v} for name, (b, v) in best.items()}
    settings = {
        "gguf": gguf.name,
        "prompt_tokens": len(ids),
        "decode_tokens": args.tokens,
        "batches": args.batches,
        "threads": args.threads,
        "rounds": args.rounds,
        "ragadapt_dtype": str(bf16.dtype),
    }
    line = "; ".join(
        f"{name} batch {b1}: prefill {speeds[name][b1]['prefill_tokens_per_s']} decode "
        f"{speeds[name][b1]['decode_tokens_per_s']} tok/s, best decode "
        f"{best[name][1]['decode_tokens_per_s']} at batch {best[name][0]}"
        for name in speeds
    )
    if args.quality:
        q = results["quality_int4"]
        line += (
            f"; int4 answers F1 {q['f1']['int4']} vs bf16 {q['f1']['bf16']} on {q['questions']} dev "
            f"questions (difference CI {q['ci95']})"
        )
    record(
        "peer_llama_cpp", settings, results, f"{len(ids)}-token RAG prompt, {args.threads} threads: {line}"
    )


if __name__ == "__main__":
    main()

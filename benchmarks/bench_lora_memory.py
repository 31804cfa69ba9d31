"""LoRA vs full fine-tuning on the embedded default backbone: trainable parameters, peak memory, load time.

    .venv/bin/python benchmarks/bench_lora_memory.py

One RAG End2End training step (4 covid questions, k=5 passages each, RAG-sequence loss through all three
components, AdamW) per configuration, each in a fresh subprocess so its memory is its own:

- full_fp32:      every weight trainable (encoder shared by both roles, generator), fp32, no checkpointing
- lora_fp32:      frozen fp32 weights, LoRA r=8 on Q/K/V of the three components (the same settings
  otherwise)
- lora_bf16:      frozen bf16 weights, LoRA
- lora_bf16_ckpt: frozen bf16 weights, LoRA, activation checkpointing in the generator

Peak memory is the process's peak resident set during the two training steps (the high-water mark is reset
after loading, so loading's transient copies do not count; weights, gradients, optimizer state and
activations do). Also: backbone load time from the GGUF file (converted on first use) vs from the converted
cache.

Writes `benchmarks/results/lora_memory.json` and one line in `benchmarks/RESULTS.md`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

DATA_DIR = ROOT.parent / "shared" / "data"
CONFIGS = {
    "full_fp32": {"dtype": "float32", "train": "full", "checkpointing": False},
    "lora_fp32": {"dtype": "float32", "train": "lora", "checkpointing": False},
    "lora_bf16": {"dtype": "bfloat16", "train": "lora", "checkpointing": False},
    "lora_bf16_ckpt": {"dtype": "bfloat16", "train": "lora", "checkpointing": True},
}


def _status(field: str) -> int:
    """A /proc/self/status memory field in bytes (VmRSS: now, VmHWM: peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> bool:
    """Reset the peak-RSS mark (Linux clear_refs "5"); False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _batch(n: int, k: int):
    from backbone import Passage

    passages = [json.loads(line) for line in (DATA_DIR / "covid" / "passages.jsonl").open()]
    position = {p["id"]: i for i, p in enumerate(passages)}
    questions, answers, retrieved = [], [], []
    for line in (DATA_DIR / "covid" / "qa.jsonl").open():
        q = json.loads(line)
        if q["split"] != "train" or not q["passage_ids"]:
            continue
        start = position[q["passage_ids"][0]]
        rows = passages[start : start + k]  # the gold passage and the ones after it: same size every config
        questions.append(q["question"])
        answers.append(q["answers"][0])
        retrieved.append([Passage(p["id"], p["title"], p["text"]) for p in rows])
        if len(questions) == n:
            return questions, answers, retrieved
    raise SystemExit("not enough covid questions")


def child(name: str, cache_dir: Path, steps: int) -> dict:
    """Runs in a fresh interpreter: load, train `steps` steps, report."""
    import torch

    from backbone import Backbone, embedded_default_config

    settings = CONFIGS[name]
    started = time.perf_counter()
    backbone = Backbone.load(embedded_default_config(cache_dir=cache_dir, dtype=settings["dtype"]))
    load_s = time.perf_counter() - started
    backbone.add_adapter_set("bench")
    questions, answers, passages = _batch(4, 5)

    models = {
        id(backbone.question.host.model): backbone.question.host.model,
        id(backbone.passage.host.model): backbone.passage.host.model,
        id(backbone.generator.host.model): backbone.generator.host.model,
    }
    named = {id(p): (n, p) for model in models.values() for n, p in model.named_parameters()}
    lora = [p for n, p in named.values() if "lora_" in n]
    frozen = [p for n, p in named.values() if "lora_" not in n]
    total = sum(p.numel() for p in frozen) + sum(p.numel() for p in lora)

    rss_loaded = _status("VmRSS")
    reset = _reset_peak()
    seconds = []
    with backbone.training("bench", checkpointing=settings["checkpointing"]) as lora_params:
        if settings["train"] == "full":
            for p in lora_params:
                p.requires_grad_(False)
            for p in frozen:
                p.requires_grad_(True)
            trainable = frozen
        else:
            trainable = lora_params
        optimizer = torch.optim.AdamW(trainable, lr=1e-5)
        for _ in range(steps):
            t = time.perf_counter()
            loss = backbone.rag_loss(questions, answers, passages, "bench")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds.append(round(time.perf_counter() - t, 2))
    return {
        "config": settings,
        "dtype": str(backbone.dtype),
        "parameters_total": total,
        "parameters_trainable": sum(p.numel() for p in trainable),
        "trainable_share": round(sum(p.numel() for p in trainable) / total, 6),
        "rss_after_load_mb": round(rss_loaded / 2**20, 1),
        "peak_rss_step_mb": round(_status("VmHWM") / 2**20, 1),
        "peak_reset_after_load": reset,
        "step_seconds": seconds,
        "load_seconds": round(load_s, 2),
        "loss": round(loss.item(), 4),
    }


def load_child(cache_dir: Path) -> dict:
    """Runs in a fresh interpreter: time one backbone load (converting the GGUF if the cache lacks it)."""
    from backbone import Backbone, embedded_default_config

    started = time.perf_counter()
    backbone = Backbone.load(embedded_default_config(cache_dir=cache_dir))
    return {"load_seconds": round(time.perf_counter() - started, 2), "fingerprint": backbone.fingerprint}


def spawn(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--child", choices=sorted(CONFIGS))
    parser.add_argument("--load-child", action="store_true")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "ragadapt")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.cache_dir, args.steps)))
        return
    if args.load_child:
        print(json.dumps(load_child(args.cache_dir)))
        return

    from reporting import record

    results = {}
    for name in args.configs:
        results[name] = spawn(
            ["--child", name, "--steps", str(args.steps), "--cache-dir", str(args.cache_dir)]
        )
        print(name, results[name], flush=True)
    with tempfile.TemporaryDirectory(prefix="ragadapt-load-") as fresh:
        from_gguf = spawn(["--load-child", "--cache-dir", fresh])
        from_cache = spawn(["--load-child", "--cache-dir", fresh])
    loading = {
        "from_gguf_first_load_s": from_gguf["load_seconds"],
        "from_converted_cache_s": from_cache["load_seconds"],
    }
    print(loading, flush=True)

    full, lora_same, lora_best = results["full_fp32"], results["lora_fp32"], results["lora_bf16_ckpt"]
    ratios = {
        "lora_bf16_ckpt_vs_full_fp32": round(lora_best["peak_rss_step_mb"] / full["peak_rss_step_mb"], 3),
        "lora_fp32_vs_full_fp32_same_settings": round(
            lora_same["peak_rss_step_mb"] / full["peak_rss_step_mb"], 3
        ),
    }
    settings = {
        "batch": "4 covid train questions x 5 passages (gold + the 4 following), RAG-sequence loss",
        "steps_per_config": args.steps,
        "optimizer": "AdamW",
        "lora": "r=8 alpha=16 on Q/K/V",
        "memory": "peak RSS of a fresh process during the steps (VmHWM reset after loading)",
    }
    summary = (
        f"trainable LoRA {lora_best['parameters_trainable']:,} of {lora_best['parameters_total']:,} "
        f"({100 * lora_best['trainable_share']:.2f}%); peak RSS of one step (4 q x k=5): full fp32 "
        f"{full['peak_rss_step_mb']:.0f} MB, LoRA fp32 {lora_same['peak_rss_step_mb']:.0f} MB "
        f"({ratios['lora_fp32_vs_full_fp32_same_settings']:.2f}x), LoRA bf16 "
        f"{results['lora_bf16']['peak_rss_step_mb']:.0f} MB, LoRA bf16 + checkpointing "
        f"{lora_best['peak_rss_step_mb']:.0f} MB ({ratios['lora_bf16_ckpt_vs_full_fp32']:.2f}x); "
        f"load from GGUF {loading['from_gguf_first_load_s']:.1f} s vs converted cache "
        f"{loading['from_converted_cache_s']:.1f} s"
    )
    path = record(
        "lora_memory", settings, {"configs": results, "ratios": ratios, "loading": loading}, summary
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""What per-row adapters cost the generator, apart from the service: the same rows decoded and prefilled
under 4 adapters mixed, under one adapter, and on the base model, with ragadapt's batched LoRA path and with
PEFT's own mixed-batch path (what served before). Writes results, never asserts.

    .venv/bin/python benchmarks/bench_mixed_lora.py [--rows 24] [--dtype auto]

Rows: `--rows` RAG prompts (covid dev questions over their gold passages, as the service builds them), r=8
adapters on Q/K/V with small random B. Per setting: the median decoding step over `--steps` steps and one
prefill of all rows; settings alternate over `--rounds` rounds and the best round counts. The service's
mixed/single throughput (bench_service.py) also differs in answers and passages between its workloads; this
holds everything but the adapters fixed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from bench_prefill import prompts  # noqa: E402

from backbone import Backbone, embedded_default_config  # noqa: E402
from backbone.lora import BASE, AdapterHost  # noqa: E402

from reporting import record  # noqa: E402


@contextmanager
def peft_rows():
    """PEFT's own per-row path (gather, two matmuls and a scatter per adapter) in place of ragadapt's."""
    ours = AdapterHost.forward

    def forward(self, adapters, **inputs):
        if adapters is None or self.peft is None:
            return ours(self, adapters, **inputs)
        return self.peft(**inputs, adapter_names=self.slots_of(adapters))

    AdapterHost.forward = forward
    try:
        yield
    finally:
        AdapterHost.forward = ours


def measure(backbone: Backbone, rows, names: list[str], steps: int) -> tuple[float, float]:
    """(prefill seconds, median decoding step seconds)."""
    decoding = backbone.generator.decoding(None)
    with torch.inference_mode():
        started = time.perf_counter()
        decoding.add(rows, names, [10**6] * len(rows))
        prefill = time.perf_counter() - started
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            decoding.step()
            times.append(time.perf_counter() - started)
    return prefill, statistics.median(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "auto"], default="auto")
    args = parser.parse_args()

    backbone = Backbone.load(embedded_default_config(dtype=args.dtype))
    backbone.generator.eos_ids = []  # rows decode until dropped: every step runs every row
    keys = [f"bench-{i}" for i in range(args.adapters)]
    generator = torch.Generator().manual_seed(0)
    for key in keys:
        backbone.add_adapter_set(key)
        with torch.no_grad():
            for params in backbone.trainable_parameters(key).values():
                for param in params:
                    if param.abs().sum() == 0:  # LoRA B starts at zero; make the adapter do something
                        param.copy_(torch.randn(param.shape, generator=generator) * 1e-3)
    rows, _ = prompts(backbone, args.rows, long_tokens=0)
    names = backbone._names("generator", keys)
    settings_rows = {
        "mixed": [names[i % len(names)] for i in range(len(rows))],
        "single": [names[0]] * len(rows),
        "base": [BASE] * len(rows),
    }
    results: dict[str, dict] = {}
    for number in range(args.rounds):
        for path in ("ragadapt", "peft"):
            for label, row_names in settings_rows.items():
                if path == "peft" and label == "base":
                    continue  # no adapters: the same path either way
                with peft_rows() if path == "peft" else nullcontext():
                    prefill, step = measure(backbone, rows, row_names, args.steps)
                name = f"{path}_{label}"
                best = results.setdefault(name, {"prefill_ms": 1e9, "step_ms": 1e9})
                best["prefill_ms"] = round(min(best["prefill_ms"], 1000 * prefill), 1)
                best["step_ms"] = round(min(best["step_ms"], 1000 * step), 1)
                print(
                    f"  round {number + 1} {name}: prefill {1000 * prefill:.0f} ms, step {1000 * step:.1f} ms"
                )
    ratios = {
        f"{path}_mixed_over_single_step": round(
            results[f"{path}_single"]["step_ms"] / results[f"{path}_mixed"]["step_ms"], 3
        )
        for path in ("ragadapt", "peft")
    }
    ratios["ragadapt_mixed_over_single_prefill"] = round(
        results["ragadapt_single"]["prefill_ms"] / results["ragadapt_mixed"]["prefill_ms"], 3
    )
    settings = {
        "rows": len(rows),
        "adapters_mixed": args.adapters,
        "lora": "r=8 on Q/K/V",
        "steps": args.steps,
        "rounds": args.rounds,
        "dtype": str(backbone.dtype),
        "threads": torch.get_num_threads(),
    }
    r = results
    record(
        "mixed_lora",
        settings,
        {"best": results, "speed_ratios": ratios},
        f"{len(rows)} rows, {args.adapters} adapters mixed vs 1 vs base, {settings['dtype']}: decoding step "
        f"ragadapt {r['ragadapt_mixed']['step_ms']}/{r['ragadapt_single']['step_ms']}/"
        f"{r['ragadapt_base']['step_ms']} ms "
        f"(mixed/single speed {ratios['ragadapt_mixed_over_single_step']}x), "
        f"PEFT's path {r['peft_mixed']['step_ms']}/{r['peft_single']['step_ms']} ms "
        f"({ratios['peft_mixed_over_single_step']}x); prefill ragadapt {r['ragadapt_mixed']['prefill_ms']}/"
        f"{r['ragadapt_single']['prefill_ms']}/{r['ragadapt_base']['prefill_ms']} ms",
    )


if __name__ == "__main__":
    main()

"""What every benchmark result records about the machine it ran on, so runs can be compared."""

from __future__ import annotations

import json
import os
import platform
from datetime import UTC, datetime
from pathlib import Path

import faiss
import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS_MD = RESULTS_DIR.parent / "RESULTS.md"


def machine() -> dict:
    """CPU model, cores, library versions, GPU and load: the cores here are shared, so the load says how
    busy."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()],
    }


def record(name: str, settings: dict, results: dict, summary: str, results_key: str = "results") -> Path:
    """Write results/<name>.json (machine, date, settings, numbers under `results_key`); append one line to
    RESULTS.md and print it."""
    date = datetime.now(UTC).isoformat(timespec="seconds")
    payload = {
        "benchmark": name,
        "date": date,
        "machine": machine(),
        "settings": settings,
        results_key: results,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    if not RESULTS_MD.exists():
        RESULTS_MD.write_text(
            "# Benchmark results\n\nOne line per benchmark run, newest last; details in "
            "`benchmarks/results/*.json`.\n\n"
        )
    m = payload["machine"]
    with RESULTS_MD.open("a") as fh:
        fh.write(f"- {date[:10]} {name} ({m['cpu']}, {m['cores']} cores): {summary}\n")
    print(f"{name}: {summary}")
    return path

"""What every benchmark result records about the machine it ran on, so runs can be compared."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import faiss
import torch


def machine() -> dict:
    """CPU model, cores, library versions, GPU and load: the cores here are shared, so the load says how busy."""
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

"""The machine a benchmark ran on, in one place for every report under ``benchmarks/results``."""

from __future__ import annotations

import os
import platform
from datetime import UTC, datetime
from pathlib import Path


def machine_info() -> dict[str, str]:
    """CPU model, cores, RAM, the accelerator (if any), Python and torch versions, torch's CPU threads, the date."""
    import torch

    cpu = platform.processor() or platform.machine() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "unknown"
    try:
        kb = int(next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal")).split()[1])
        ram = f"{kb / 2**20:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    gpu = "none"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = (f"{torch.cuda.device_count()} x {props.name} ({props.total_memory / 2**30:.0f} GiB), "
               f"CUDA {torch.version.cuda}")
    return {"cpu": cpu, "cores": str(os.cpu_count()), "ram": ram, "gpu": gpu, "python": platform.python_version(),
            "torch": torch.__version__, "threads": str(torch.get_num_threads()), "platform": platform.platform(),
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}

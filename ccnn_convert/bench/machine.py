"""Where a benchmark ran: device, CPU, threads, versions and the machine's load.

Ratios are only comparable between runs on the same machine under a similar load, so every
report carries these settings (:func:`machine_settings`) and the 1-minute load average before
and after measuring (:func:`load_average`).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

__all__ = ["MEMORY_CPU", "MEMORY_CUDA", "cpu_name", "load_average", "machine_settings"]

# How peak memory was measured (see :mod:`.measure`); the report explains each.
MEMORY_CPU = "cpu_profiler_peak"
MEMORY_CUDA = "cuda_max_allocated"


def machine_settings(device: torch.device) -> dict:
    """Device, its name, thread count, versions and the peak-memory method for ``device``."""
    settings = {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
                "python": platform.python_version(), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        settings["device_name"] = torch.cuda.get_device_name(device)
        settings["memory_kind"] = MEMORY_CUDA
    else:
        settings["device_name"] = cpu_name()
        settings["memory_kind"] = MEMORY_CPU
    return settings


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else the machine architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def load_average() -> float | None:
    """The 1-minute load average, or None where the platform has none."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None

"""Starting a command in a child Python and stopping it at a chosen point, for the signal tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def stop_when_ready(code: str, args: list[str], cwd: Path, signum: int, env: dict[str, str] | None = None,
                    timeout: float = 120) -> tuple[int, str]:
    """Run ``python -c code *args`` in ``cwd``; when it prints the line ``ready``, send it
    ``signum``; -> (exit code, stderr)."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    process = subprocess.Popen([sys.executable, "-c", code, *args], cwd=cwd, env=environment, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in process.stdout:
        if line.strip() == "ready":
            break
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=timeout)
    return process.returncode, stderr

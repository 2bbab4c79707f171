"""matplotlib without a display, and PNG files written atomically (bench and visualize plots)."""

from __future__ import annotations

import os
from pathlib import Path

from .outputs import atomic_path

__all__ = ["pyplot", "save_png"]


def pyplot():
    """matplotlib.pyplot on the Agg backend (works on machines with no display)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | os.PathLike, *, force: bool = False, dpi: float | None = None) -> Path:
    """Write ``fig`` to ``path`` as PNG, atomically; the figure's pixel size is kept exactly."""
    path = Path(path)
    with atomic_path(path, force=force) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi or fig.dpi)
    return path

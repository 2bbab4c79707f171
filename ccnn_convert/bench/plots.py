"""Two pictures of a benchmark: time ratios per model and mode, and the keep_first sweep.

Every plot is exactly :data:`PLOT_SIZE_PX` pixels, so reports from different runs line up.
Files are written through :func:`ccnn_convert.plotting.save_png` (atomic, no overwrite
without ``force``).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..plotting import pyplot, save_png
from .report import BenchReport

__all__ = ["PLOT_SIZE_PX", "plot_sweep", "plot_time_ratios"]

PLOT_SIZE_PX = (800, 400)  # every plot is exactly this size
_DPI = 100


def _figure(plt):
    return plt.subplots(figsize=(PLOT_SIZE_PX[0] / _DPI, PLOT_SIZE_PX[1] / _DPI), dpi=_DPI)


def _save(plt, fig, path: str | os.PathLike, force: bool) -> Path:
    try:
        return save_png(fig, path, force=force, dpi=_DPI)
    finally:
        plt.close(fig)


def plot_time_ratios(report: BenchReport, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Bars: time per batch / original's, per model and mode (log scale); dots: the FLOP ratio."""
    plt = pyplot()
    base = [m for m in report.measurements if m.keep_first == 0 and m.mode != "original"]
    labels = list(dict.fromkeys(m.label for m in base))
    models = report.models
    fig, ax = _figure(plt)
    width = 0.8 / max(len(labels), 1)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, label in enumerate(labels):
        xs, times, flops, flop_xs = [], [], [], []
        for j, model in enumerate(models):
            m = next((m for m in base if m.model == model and m.label == label), None)
            if m is None:
                continue
            x = j - 0.4 + width * (i + 0.5)
            if m.time_ratio is not None:
                xs.append(x)
                times.append(m.time_ratio)
            if m.flop_ratio is not None:
                flop_xs.append(x)
                flops.append(m.flop_ratio)
        ax.bar(xs, times, width * 0.9, color=colours[i % len(colours)], label=f"{label}: time")
        ax.scatter(flop_xs, flops, marker="_", s=400 * width, color="black", zorder=3,
                   label="FLOPs (same ratio)" if i == 0 else None)
        for x, value in zip(xs, times):
            ax.annotate(f"{value:.3g}", (x, value), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels(models, fontsize=8)
    ax.set_yscale("log")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_ylabel("converted / original")
    device = report.settings.get("device", "?")
    batch = report.settings.get("batch_size", "?")
    ax.set_title(f"time per batch relative to the original (batch {batch}, {device})", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.1, top=0.9)
    return _save(plt, fig, path, force)


def plot_sweep(report: BenchReport, path: str | os.PathLike, *, force: bool = False) -> Path:
    """The keep_first sweep: top-1 against time ratio (time ratio against keep_first without top-1)."""
    plt = pyplot()
    fig, ax = _figure(plt)
    with_top1 = any(m.top1 is not None for m in report.measurements)
    for model in report.models:
        _sweep_lines(ax, report, model, with_top1)
    if with_top1:
        ax.set_xscale("log")
        ax.set_xlabel("time per batch / original (log)")
        ax.set_ylabel("top-1 (%)")
        ax.set_title("keep_first sweep: accuracy against cost (k = steps kept traditional)", fontsize=10)
    else:
        ax.set_yscale("log")
        ax.set_xlabel("keep_first (leading subsampling steps left traditional)")
        ax.set_ylabel("time per batch / original (log)")
        ax.set_title("keep_first sweep: cost", fontsize=10)
    ax.grid(True, which="both", linewidth=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.12, top=0.9)
    return _save(plt, fig, path, force)


def _sweep_lines(ax, report: BenchReport, model: str, with_top1: bool) -> None:
    """One line per converted mode of ``model``, and a star for its original (with top-1)."""
    rows = report.for_model(model)
    original = next((m for m in rows if m.mode == "original"), None)
    for mode in dict.fromkeys(m.mode for m in rows if m.mode not in ("original", "traditional")):
        series = sorted((m for m in rows if m.mode == mode and m.time_ratio is not None), key=lambda m: m.keep_first)
        if with_top1:
            series = [m for m in series if m.top1 is not None]
            xs, ys = [m.time_ratio for m in series], [m.top1 for m in series]
        else:
            xs, ys = [m.keep_first for m in series], [m.time_ratio for m in series]
        if not series:
            continue
        ax.plot(xs, ys, marker="o", label=f"{model} {mode}")
        if with_top1:
            for m in series:
                ax.annotate(f"k={m.keep_first}", (m.time_ratio, m.top1), textcoords="offset points",
                            xytext=(3, 3), fontsize=7)
    if with_top1 and original is not None and original.top1 is not None:
        ax.scatter([1.0], [original.top1], marker="*", s=80, color="black", zorder=3)
        ax.annotate(f"{model} original", (1.0, original.top1), textcoords="offset points", xytext=(4, -10),
                    fontsize=7)

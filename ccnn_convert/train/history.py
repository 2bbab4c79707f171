"""What a training run leaves besides weights: a JSON history and a PNG learning curve."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..outputs import atomic_path
from ..plotting import pyplot, save_png
from .loop import EpochRecord, best_record

__all__ = ["plot_curves", "write_history"]


def write_history(path: str | Path, records: Sequence[EpochRecord], about: Mapping[str, Any]) -> None:
    """``{"run": about, "epochs": [...], "best": {...}}``, written atomically."""
    epochs = [asdict(r) for r in records]
    best = best_record(list(records))
    with atomic_path(path, force=True) as tmp:
        tmp.write_text(json.dumps({"run": dict(about), "epochs": epochs, "best": best and asdict(best)}, indent=2) + "\n")


def plot_curves(path: str | Path, records: Sequence[EpochRecord], title: str) -> None:
    """Loss and top-1 per epoch, train and val, side by side."""
    plt = pyplot()
    epochs = [r.epoch for r in records]
    fig, (loss_ax, top1_ax) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=100)
    loss_ax.plot(epochs, [r.train_loss for r in records], "o-", label="train")
    top1_ax.plot(epochs, [r.train_top1 for r in records], "o-", label="train (augmented, training mode)")
    if any(r.val_top1 is not None for r in records):
        loss_ax.plot(epochs, [r.val_loss for r in records], "s-", label="val")
        top1_ax.plot(epochs, [r.val_top1 for r in records], "s-", label="val")
    if any(r.val_agreement is not None for r in records):  # distillation: against the teacher
        loss_ax.plot(epochs, [r.val_kl for r in records], "^-", label="val KL to the teacher")
        top1_ax.plot(epochs, [r.val_agreement for r in records], "^-", label="val agreement with the teacher")
    loss_ax.set(xlabel="epoch", ylabel="loss per image", title="loss")
    top1_ax.set(xlabel="epoch", ylabel="top-1 (%)", title="top-1")
    for ax in (loss_ax, top1_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        save_png(fig, path, force=True)
    finally:
        plt.close(fig)

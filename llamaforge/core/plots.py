"""Plots people would rather look at than read: loss curves of a run, validation curves of an ablation.

matplotlib is imported lazily with the Agg backend, so training never needs a display and importing llamaforge
never pays for matplotlib. Without matplotlib installed the plots are skipped, never the run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _pyplot() -> Any | None:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, plt: Any, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)
    return out


def plot_loss_curve(
    train: Sequence[tuple[int, float]], val: Sequence[tuple[int, float]], out: str | Path, *, title: str = ""
) -> Path | None:
    """Training and validation loss against steps."""
    plt = _pyplot()
    if plt is None or not (train or val):
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train", lw=1.4)
    if val:
        ax.plot(*zip(*val), label="validation", marker="o", ms=3, lw=1.4)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    return _save(fig, plt, Path(out))


def plot_curves(
    curves: Mapping[str, Sequence[tuple[int, float]]], out: str | Path, *, title: str = "", ylabel: str = "loss"
) -> Path | None:
    """One line per named curve (ablation variants), same axes."""
    plt = _pyplot()
    if plt is None or not any(curves.values()):
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    for name, points in curves.items():
        if points:
            ax.plot(*zip(*points), label=name, marker="o", ms=3, lw=1.4)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    return _save(fig, plt, Path(out))

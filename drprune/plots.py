"""PNG plots of a run: domain weights over steps, per-domain eval loss against its reference."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from drprune.atomic import atomic_output  # noqa: E402


def save_figure(fig, path: Path) -> None:
    """Write a PNG atomically: never a half-written picture."""
    with atomic_output(path, overwrite=True) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_weights(history: Sequence[tuple[int, Sequence[float]]], names: Sequence[str], path: Path,
                 title: str = "Data mixture over training") -> None:
    """Domain weights over steps, one line per name; `history` holds (step, weights) pairs."""
    fig, ax = plt.subplots(figsize=(7, 4))
    if history:
        steps = [s for s, _ in history]
        for i, name in enumerate(names):
            ax.plot(steps, [w[i] for _, w in history], label=name)
    ax.set(xlabel="step", ylabel="domain weight", title=title, ylim=(0, None))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_eval_losses(history: Sequence[tuple[int, Sequence[float], Sequence[float] | None]],
                     names: Sequence[str], path: Path) -> None:
    """Per-domain eval loss over steps, its reference loss dashed where the history has one."""
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    rows = [(s, losses, ref) for s, losses, ref in history if losses]
    for i, name in enumerate(names):
        color = colors[i % len(colors)]
        if rows:
            ax.plot([s for s, _, _ in rows], [losses[i] for _, losses, _ in rows], "o-", color=color, label=name)
            refs = [(s, ref[i]) for s, _, ref in rows if ref]
            if refs:
                ax.plot([s for s, _ in refs], [r for _, r in refs], "--", color=color, alpha=0.7)
    ax.set(xlabel="step", ylabel="eval loss (dashed: reference)", title="Per-domain eval loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_series(series: dict[str, Sequence[tuple[int, float]]], path: Path, *, ylabel: str, title: str) -> None:
    """Generic step/value lines (e.g. expected sparsity per module)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in series.items():
        ax.plot([s for s, _ in points], [v for _, v in points], label=name)
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)

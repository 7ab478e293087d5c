"""PNG plots for the run record: training curves, best/worst per-class AP, mAP per epoch.

Uses matplotlib's object API with the Agg canvas (no pyplot global state), so it is safe to
call from any thread and needs no display.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Series = Sequence[tuple[float, float]]


def _save(fig: Figure, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return out


def training_curves(history: dict[str, Series], out: Path, *, max_panels: int = 9) -> Path:
    """One panel per metric (losses first), x = optimizer step."""
    keys = sorted(history, key=lambda k: (not k.endswith("loss") and "loss" not in k, k))
    keys = [k for k in keys if history[k]][:max_panels]
    if not keys:
        raise ValueError("training_curves: no metric has any point to plot")
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows))
    for i, key in enumerate(keys):
        ax = fig.add_subplot(rows, cols, i + 1)
        steps, values = zip(*history[key], strict=True)
        ax.plot(steps, values, "-o" if len(steps) < 30 else "-", lw=1.2, ms=3)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return _save(fig, out)


def class_ap_extremes(
    ap: Sequence[float], class_names: Sequence[str], out: Path, *, n: int = 10, title: str = ""
) -> Path:
    """Horizontal bars: the ``n`` best and ``n`` worst classes by AP (NaN classes left out)."""
    ap = np.asarray(ap, dtype=float)
    if len(ap) != len(class_names):
        raise ValueError(f"class_ap_extremes: {len(ap)} APs but {len(class_names)} class names")
    valid = np.flatnonzero(~np.isnan(ap))
    order = valid[np.argsort(ap[valid])]
    n = min(n, max(1, len(order) // 2)) if len(order) > 1 else len(order)
    worst, best = order[:n], order[::-1][:n]
    fig = Figure(figsize=(11, 0.35 * max(n, 4) + 1.2))
    for col, (idx, label, color) in enumerate(
        [(best, f"best {len(best)}", "tab:green"), (worst, f"worst {len(worst)}", "tab:red")]
    ):
        ax = fig.add_subplot(1, 2, col + 1)
        ax.barh(range(len(idx)), ap[idx], color=color)
        ax.set_yticks(range(len(idx)), [class_names[i][:32] for i in idx], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("AP")
        ax.set_title(f"{title} {label}".strip(), fontsize=10)
    return _save(fig, out)


def map_per_epoch(series: dict[str, Series], out: Path) -> Path:
    """mAP against epoch, one line per evaluated model (e.g. student vs teacher)."""
    if not any(series.values()):
        raise ValueError("map_per_epoch: no evaluation to plot")
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot(1, 1, 1)
    for i, (name, points) in enumerate(sorted(series.items())):
        if not points:
            continue
        epochs, values = zip(*points, strict=True)
        ax.plot(epochs, values, "-o", color=f"C{i}", label=f"{name} (last {values[-1]:.3f})")
        if len(points) == 1:  # one evaluation (a frozen teacher): also a reference line
            ax.axhline(values[0], ls="--", lw=1, color=f"C{i}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mAP")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out)

"""What the tracker derives from the trainer's calls: eval summaries, per-class tables, metric
curves for the plots, and names MLflow accepts. No MLflow here."""

from __future__ import annotations

import csv
import posixpath
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


class Curves:
    """Metric history for plots, thinned by half whenever a series reaches ``cap`` points."""

    def __init__(self, cap: int = 4000) -> None:
        self.cap = cap
        self.series: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self._every: dict[str, int] = defaultdict(lambda: 1)
        self._seen: dict[str, int] = defaultdict(int)

    def add(self, key: str, step: int, value: float) -> None:
        self._seen[key] += 1
        if (self._seen[key] - 1) % self._every[key]:
            return
        series = self.series[key]
        series.append((step, value))
        if len(series) >= self.cap:
            self.series[key] = series[::2]
            self._every[key] *= 2


_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")


def safe_key(key: str) -> str:
    """A name MLflow accepts (alphanumerics, _ - . space : /, no empty or '..' path parts);
    a bad name would make the server refuse a whole batch."""
    clean = _BAD_KEY_CHARS.sub("_", str(key))
    norm = posixpath.normpath(clean) if clean else "_"
    if norm != clean or norm in (".", "..") or norm.startswith(("/", "..")):
        clean = clean.replace("/", "_").replace("..", "__") or "_"
    return clean


def eval_parts(stats: Any) -> tuple[dict[str, float], np.ndarray | None, np.ndarray | None]:
    """(summary with mAP/mAUC/dprime, per-class AP, per-class AUC) from a dict or EvalResult."""
    if hasattr(stats, "summary"):  # cmkd_scale.evaluate.EvalResult
        summary, ap, auc = dict(stats.summary), stats.class_ap, stats.class_auc
    elif isinstance(stats, dict):
        summary = {k: stats[k] for k in ("mAP", "mAUC", "dprime") if k in stats}
        ap, auc = stats.get("AP"), stats.get("AUC")
    else:
        raise TypeError(f"log_eval: stats must be a dict or EvalResult, got {type(stats).__name__}")
    if "mAP" not in summary:
        raise ValueError(f"log_eval: stats lack 'mAP' (have {sorted(summary)})")
    summary = {k: float(v) for k, v in summary.items()}
    ap = None if ap is None else np.asarray(ap, dtype=float)
    auc = None if auc is None else np.asarray(auc, dtype=float)
    return summary, ap, auc


def write_class_table(
    path: Path, class_names: Sequence[str], ap: np.ndarray, auc: np.ndarray | None
) -> None:
    """Per-class AP (and AUC) with class names, ranked best first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    order = np.argsort(-np.nan_to_num(ap, nan=-1.0), kind="stable")
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["rank", "index", "display_name", "AP", "AUC"])
        for rank, i in enumerate(order, start=1):
            writer.writerow(
                [
                    rank,
                    int(i),
                    class_names[i],
                    f"{ap[i]:.6f}",
                    "" if auc is None else f"{auc[i]:.6f}",
                ]
            )

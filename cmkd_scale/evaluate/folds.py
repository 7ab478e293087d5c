"""Cross-validation over fold runs (ESC-50, as AST's ``egs/esc50/get_esc_result.py``).

    python -m cmkd_scale.evaluate folds runs/esc50_ast/fold-1 ... runs/esc50_ast/fold-5
        [--metric acc|mAP|mAUC|dprime] [--split eval|val] [--out DIR]

Each fold run evaluates its student at every epoch end (``metrics.jsonl`` records, or
``eval/<name>_summary.json`` files). For every epoch that all folds reached, the mean over the
folds of the metric; the epoch with the best mean is ONE epoch for all folds (the protocol of
AST's ESC-50 result), printed as mean ± std (sample std over the folds) beside the last
epoch's. The numbers go to ``folds_summary.json`` (default: in the folds' common parent).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cmkd_scale.logs import setup_logging

log = logging.getLogger(__name__)

METRICS = ("acc", "mAP", "mAUC", "dprime")
_EPOCH = re.compile(r"^epoch-(\d+)$")


def _from_records(run_dir: Path, split: str) -> dict[int, dict[str, float]]:
    """Epoch -> summary from ``metrics.jsonl`` (the last record of an epoch wins)."""
    path = run_dir / "metrics.jsonl"
    out: dict[int, dict[str, float]] = {}
    if not path.is_file():
        return out
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d is not JSON (a line cut by a kill?): skipped", path, number)
            continue
        match = _EPOCH.match(str(record.get("eval", "")))
        if match and record.get("split", "eval") == split:
            out[int(match.group(1))] = record
    return out


def _from_summaries(run_dir: Path, split: str) -> dict[int, dict[str, float]]:
    """Epoch -> summary from ``eval/[val_]epoch-NNN_summary.json``."""
    prefix = "" if split == "eval" else f"{split}_"
    out = {}
    for path in sorted((run_dir / "eval").glob(f"{prefix}epoch-*_summary.json")):
        match = _EPOCH.match(path.name.removeprefix(prefix).removesuffix("_summary.json"))
        if match:
            out[int(match.group(1))] = json.loads(path.read_text())
    return out


def epoch_metrics(run_dir: Path, metric: str, split: str = "eval") -> dict[int, float]:
    """One fold run's per-epoch ``metric`` on ``split``."""
    found = _from_records(run_dir, split) or _from_summaries(run_dir, split)
    if not found:
        raise FileNotFoundError(
            f"{run_dir}: no per-epoch evaluations on {split!r} (metrics.jsonl records or "
            f"eval/*epoch-*_summary.json); is it a training run directory?"
        )
    values = {}
    for epoch, summary in sorted(found.items()):
        if metric not in summary:
            raise KeyError(f"{run_dir}: the epoch {epoch} evaluation has no {metric!r}")
        values[epoch] = float(summary[metric])
    return values


def _stats(values: Sequence[float]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return {"mean": float(arr.mean()), "std": std, "folds": [float(v) for v in arr]}


def fold_summary(
    run_dirs: Sequence[Path], metric: str = "acc", split: str = "eval"
) -> dict[str, Any]:
    """Per-epoch mean/std over the folds, the best-mean epoch and the last common epoch."""
    if metric not in METRICS:
        raise ValueError(f"--metric {metric!r}: expected one of {list(METRICS)}")
    if not run_dirs:
        raise ValueError("give the fold run directories")
    per_fold = [epoch_metrics(Path(d), metric, split) for d in run_dirs]
    common = sorted(set.intersection(*(set(f) for f in per_fold)))
    if not common:
        raise ValueError("the fold runs share no evaluated epoch")
    for run_dir, values in zip(run_dirs, per_fold, strict=True):
        extra = sorted(set(values) - set(common))
        if extra:
            log.warning("%s: epochs %s are not in every fold: left out", run_dir, extra)
    epochs = {e: _stats([f[e] for f in per_fold]) for e in common}
    # higher is better for every metric here; the first epoch reaching the best mean wins
    best = max(common, key=lambda e: (epochs[e]["mean"], -e))
    last = common[-1]
    return {
        "metric": metric,
        "split": split,
        "std": "sample standard deviation over the folds (ddof=1)",
        "runs": [str(d) for d in run_dirs],
        "epochs": {str(e): s for e, s in epochs.items()},
        "best": {"epoch": best, **epochs[best]},
        "last": {"epoch": last, **epochs[last]},
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cmkd_scale.evaluate folds RUN_DIR [RUN_DIR ...]``."""
    p = argparse.ArgumentParser(
        prog="python -m cmkd_scale.evaluate folds",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("runs", nargs="+", type=Path, help="the fold run directories")
    p.add_argument("--metric", default="acc", choices=METRICS, help="default: acc (ESC-50)")
    p.add_argument(
        "--split",
        default="eval",
        choices=("eval", "val"),
        help="which per-epoch evaluations (default: eval, the held-out fold)",
    )
    p.add_argument(
        "--out", type=Path, help="folder for folds_summary.json (default: the runs' common parent)"
    )
    args = p.parse_args(argv)
    setup_logging()
    summary = fold_summary(args.runs, args.metric, args.split)
    out = args.out or Path(os.path.commonpath([str(r.resolve()) for r in args.runs]))
    out.mkdir(parents=True, exist_ok=True)
    dest = out / "folds_summary.json"
    dest.write_text(json.dumps(summary, indent=2) + "\n")
    n = len(args.runs)
    for label in ("best", "last"):
        at = summary[label]
        print(
            f"{label} epoch {at['epoch']}: {args.metric} {at['mean']:.4f} ± {at['std']:.4f} "
            f"over {n} folds ({args.split})"
        )
    print(f"written {dest}")
    return 0

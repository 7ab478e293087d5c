"""Evaluation: predictions over the eval set, gathered across ranks once, scored as AudioSet.

Used by the trainer at every evaluation (train/evaluator.py) and by ``python -m
cmkd_scale.evaluate`` (__main__.py) on exported students.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmkd_scale import dist

log = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor], torch.Tensor]  # fbank [B,T,F] -> probabilities [B,C]


@dataclass
class EvalResult:
    summary: dict[str, float]  # mAP, mAUC, dprime, acc (every rank)
    class_ap: np.ndarray | None = None  # [C] (rank 0 only)
    class_auc: np.ndarray | None = None
    probs: np.ndarray | None = None  # [N, C] in global sample order (rank 0 only)
    targets: np.ndarray | None = None


def predict_local(
    forward: Forward, loader: Any, *, device: torch.device
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This rank's (index, probs, targets) for its share of the eval set, padding dropped."""
    indices, probs, targets = [], [], []
    batches, clips, start = 0, 0, time.perf_counter()
    with torch.no_grad():
        for batch in loader.batches():
            out = forward(batch.fbank.to(device, non_blocking=True)).float().cpu()
            valid = batch.valid.cpu().bool()
            indices.append(batch.index.cpu()[valid].numpy())
            probs.append(out[valid].numpy())
            targets.append(batch.labels.cpu()[valid].numpy())
            batches += 1
            clips += int(valid.sum())
    if batches != loader.steps:  # ZeRO-3 would deadlock on uneven batch counts; say so
        raise RuntimeError(f"eval loader gave {batches} batches, announced {loader.steps}")
    elapsed = time.perf_counter() - start
    log.info("eval forward: %d clips in %.1f s (%.1f clips/s)", clips, elapsed, clips / elapsed)
    if not indices:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    return np.concatenate(indices), np.concatenate(probs), np.concatenate(targets)


def assemble(
    parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], num_samples: int
) -> tuple[np.ndarray, np.ndarray]:
    """Place every rank's rows by global index; each eval clip must appear exactly once."""
    index = np.concatenate([p[0] for p in parts])
    counts = np.bincount(index, minlength=num_samples) if len(index) else np.zeros(num_samples)
    if len(counts) > num_samples or (counts != 1).any():
        dup = np.flatnonzero(counts > 1)[:5].tolist()
        miss = np.flatnonzero(counts[:num_samples] == 0)[:5].tolist()
        raise RuntimeError(
            f"eval predictions do not cover the {num_samples} eval clips exactly once "
            f"(duplicated indices {dup}, missing {miss}): the EvalLoader split is wrong"
        )
    width = next(p[1].shape[1] for p in parts if len(p[0]))
    probs = np.zeros((num_samples, width), np.float32)
    targets = np.zeros((num_samples, width), np.float32)
    for idx, p, t in parts:
        probs[idx], targets[idx] = p, t
    return probs, targets


def score(
    probs: np.ndarray, targets: np.ndarray
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """(summary, per-class AP, per-class AUC) via evaluate/metrics.py."""
    from cmkd_scale.evaluate.metrics import compute_stats, summarize

    stats = compute_stats(probs, targets)
    summary = {k: float(v) for k, v in summarize(stats).items()}
    return summary, np.asarray(stats["AP"], np.float64), np.asarray(stats["AUC"], np.float64)


def evaluate(forward: Forward, loader: Any, *, device: torch.device) -> EvalResult:
    """Predict on every rank, gather to rank 0 once, score there, share the summary."""
    local = predict_local(forward, loader, device=device)
    parts = dist.gather_objects(local)  # the one gather of this evaluation
    result = EvalResult(summary={})
    if parts is not None:
        probs, targets = assemble(parts, loader.num_samples)  # type: ignore[arg-type]
        summary, ap, auc = score(probs, targets)
        result = EvalResult(summary, ap, auc, probs, targets)
    result.summary = dist.broadcast_object(result.summary)  # type: ignore[assignment]
    return result


def write_class_ap_csv(
    path: Path, class_names: Sequence[str], ap: np.ndarray, auc: np.ndarray
) -> None:
    """Per-class AP/AUC with class names (NaN where a class has no positive clip)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["index", "display_name", "AP", "AUC"])
        for i, name in enumerate(class_names):
            writer.writerow([i, name, f"{ap[i]:.6f}", f"{auc[i]:.6f}"])


def save_result(result: EvalResult, out_dir: Path, name: str, class_names: Sequence[str]) -> Path:
    """Rank 0: ``<name>_class_ap.csv``, ``<name>_predictions.npz``, ``<name>_summary.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    assert result.class_ap is not None and result.class_auc is not None
    csv_path = out_dir / f"{name}_class_ap.csv"
    write_class_ap_csv(csv_path, class_names, result.class_ap, result.class_auc)
    np.savez_compressed(
        out_dir / f"{name}_predictions.npz", probs=result.probs, targets=result.targets
    )
    (out_dir / f"{name}_summary.json").write_text(json.dumps(result.summary, indent=2) + "\n")
    return csv_path

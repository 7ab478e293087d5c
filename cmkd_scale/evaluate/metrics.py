"""Evaluation metrics as AST's ``src/utilities/stats.py``: per-class AP and AUC, mAP, mAUC, d'.

Per class, ``sklearn.metrics.average_precision_score`` and ``roc_auc_score`` on the class's
column; mAP and mAUC are their means over classes and d' = √2 · Φ⁻¹(mAUC)
(``scipy.stats.norm.ppf``).  ``acc`` is arg-max accuracy, meaningful for single-label sets
such as ESC-50 (AST reports it there).

Classes without a positive (or without a negative) in ``targets``: AST's code gives no special
treatment -- its sklearn raised on them and the AudioSet eval set has positives for every class;
today's sklearn returns AP = 0 and AUC = NaN for them, which would bias mAP down and turn mAUC
into NaN.  Here such classes are marked unscored (AP and AUC NaN, ``scored`` False), left out of
mAP/mAUC, and their number is logged.  On sets where every class occurs, the numbers equal AST's.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from scipy import stats as scipy_stats
from sklearn import metrics

log = logging.getLogger(__name__)


def d_prime(auc: float) -> float:
    """Sensitivity index d' = √2 · Φ⁻¹(AUC)."""
    return float(np.sqrt(2.0) * scipy_stats.norm.ppf(auc))


def _check_inputs(preds: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    preds = np.asarray(preds, dtype=np.float64)
    targets = np.asarray(targets)
    if preds.ndim != 2 or preds.shape != targets.shape:
        raise ValueError(
            f"preds {preds.shape} and targets {targets.shape} must both be [clips, classes]"
        )
    if not np.isfinite(preds).all():
        raise ValueError("preds contain NaN or inf: check the model's outputs before scoring")
    if not np.isin(targets, (0, 1)).all():
        raise ValueError("targets must be 0/1 multi-hot (no label smoothing or mixup in eval)")
    return preds, targets.astype(np.int64)


def compute_stats(preds: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
    """Per-class ``AP`` and ``AUC`` arrays [C] (NaN where unscored), ``scored`` mask, ``acc``."""
    preds, targets = _check_inputs(preds, targets)
    num_classes = targets.shape[1]
    positives = targets.sum(axis=0)
    scored = (positives > 0) & (positives < targets.shape[0])
    ap = np.full(num_classes, np.nan)
    auc = np.full(num_classes, np.nan)
    for k in np.flatnonzero(scored):
        ap[k] = metrics.average_precision_score(targets[:, k], preds[:, k], average=None)
        auc[k] = metrics.roc_auc_score(targets[:, k], preds[:, k], average=None)
    unscored = int(num_classes - scored.sum())
    if unscored:
        log.warning(
            "%d of %d classes have no positive (or no negative) clip and are left out of mAP/mAUC",
            unscored,
            num_classes,
        )
    acc = float(metrics.accuracy_score(targets.argmax(axis=1), preds.argmax(axis=1)))
    return {"AP": ap, "AUC": auc, "scored": scored, "acc": acc}


def summarize(stats: dict[str, Any]) -> dict[str, float]:
    """``{"mAP", "mAUC", "dprime", "acc"}`` from :func:`compute_stats`'s output."""
    scored = stats["scored"]
    if not scored.any():
        raise ValueError("no class has both positive and negative clips: nothing to score")
    m_ap = float(np.mean(stats["AP"][scored]))
    m_auc = float(np.mean(stats["AUC"][scored]))
    return {"mAP": m_ap, "mAUC": m_auc, "dprime": d_prime(m_auc), "acc": float(stats["acc"])}

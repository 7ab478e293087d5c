"""Metrics match sklearn per class; d' follows the normal quantile; unscored classes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import average_precision_score, roc_auc_score

from cmkd_scale.evaluate.metrics import compute_stats, summarize


def random_set(clips: int = 200, classes: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    targets = (rng.random((clips, classes)) < 0.3).astype(np.float32)
    preds = np.clip(0.6 * targets + rng.random((clips, classes)) * 0.7, 0, 1)
    return preds, targets


def test_matches_sklearn():
    preds, targets = random_set()
    stats = compute_stats(preds, targets)
    for k in range(targets.shape[1]):
        assert stats["AP"][k] == pytest.approx(average_precision_score(targets[:, k], preds[:, k]))
        assert stats["AUC"][k] == pytest.approx(roc_auc_score(targets[:, k], preds[:, k]))
    summary = summarize(stats)
    assert summary["mAP"] == pytest.approx(average_precision_score(targets, preds, average="macro"))
    assert summary["mAUC"] == pytest.approx(roc_auc_score(targets, preds, average="macro"))
    assert summary["dprime"] == pytest.approx(math.sqrt(2) * norm.ppf(summary["mAUC"]))


def test_hand_computed_class():
    # scores 0.9 (pos), 0.8 (neg), 0.7 (pos), 0.1 (neg):
    # AP = (1/1 + 2/3) / 2 = 5/6; AUC = pairs ranked right / all = 3/4
    preds = np.array([[0.9], [0.8], [0.7], [0.1]])
    targets = np.array([[1], [0], [1], [0]])
    summary = summarize(compute_stats(preds, targets))
    assert summary["mAP"] == pytest.approx(5 / 6)
    assert summary["mAUC"] == pytest.approx(0.75)
    assert summary["dprime"] == pytest.approx(0.9538725524, rel=1e-6)  # √2 Φ⁻¹(0.75)


def test_classes_without_positives_are_left_out():
    preds, targets = random_set(classes=4)
    targets[:, 2] = 0  # no positive
    targets[:, 3] = 1  # no negative
    stats = compute_stats(preds, targets)
    assert stats["scored"].tolist() == [True, True, False, False]
    assert np.isnan(stats["AP"][2]) and np.isnan(stats["AUC"][3])
    summary = summarize(stats)
    assert summary["mAP"] == pytest.approx(
        average_precision_score(targets[:, :2], preds[:, :2], average="macro")
    )
    assert math.isfinite(summary["mAUC"])


def test_single_label_accuracy():
    preds = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1]])
    targets = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    assert summarize(compute_stats(preds, targets))["acc"] == pytest.approx(1 / 3)


def test_bad_inputs():
    with pytest.raises(ValueError, match="clips, classes"):
        compute_stats(np.zeros((3, 2)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="0/1"):
        compute_stats(np.zeros((2, 2)), np.full((2, 2), 0.5))
    with pytest.raises(ValueError, match="NaN"):
        compute_stats(np.full((2, 2), np.nan), np.eye(2))

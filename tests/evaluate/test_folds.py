"""``python -m cmkd_scale.evaluate folds``: ESC-50's one epoch for all folds, chosen by the mean
over the folds (AST's get_esc_result.py), on fabricated fold runs; real fold runs are in
tests/train/test_accum.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cmkd_scale.evaluate.folds import epoch_metrics, fold_summary

ROOT = Path(__file__).resolve().parents[2]
# acc per fold (rows) and epoch (columns): fold 1 peaks at epoch 2, the others at 3; the
# mean peaks at epoch 3 (0.80), which no fold's own best-epoch choice would report alone
ACC = np.array(
    [
        [0.60, 0.90, 0.70, 0.65],
        [0.50, 0.60, 0.85, 0.80],
        [0.55, 0.65, 0.85, 0.70],
    ]
)


def _fold_run(root: Path, fold: int, *, as_records: bool) -> Path:
    """A fold run dir with per-epoch evaluations on eval (and noise that must be ignored)."""
    run = root / f"fold-{fold + 1}"
    (run / "eval").mkdir(parents=True)
    lines = []
    for e, acc in enumerate(ACC[fold], 1):
        summary = {"mAP": acc / 2, "mAUC": 0.9, "dprime": 1.8, "acc": float(acc)}
        if as_records:
            lines.append({"step": 10 * e, "loss": 1.0, "epoch": e})
            lines.append({"step": 10 * e, "eval": f"epoch-{e:03d}", "split": "eval", **summary})
        else:
            (run / "eval" / f"epoch-{e:03d}_summary.json").write_text(json.dumps(summary))
    if as_records:
        # a step evaluation, an evaluation repeated after a resume (the last one counts), the
        # report: none of them is an epoch's
        lines.insert(1, {"step": 5, "eval": "step-000005", "split": "eval", "acc": 0.99})
        lines.insert(1, {"step": 10, "eval": "epoch-001", "split": "eval", "acc": 0.01})
        lines.append({"step": 40, "eval": "report", "split": "eval", "acc": 0.99})
        text = "\n".join(json.dumps(r) for r in lines) + "\n"
        (run / "metrics.jsonl").write_text(text)
    return run


@pytest.fixture()
def folds(tmp_path: Path) -> list[Path]:
    root = tmp_path / "esc50_ast"
    return [_fold_run(root, f, as_records=f != 1) for f in range(len(ACC))]  # fold 2: files


def test_the_epoch_with_the_best_mean_over_folds(folds: list[Path]) -> None:
    assert epoch_metrics(folds[0], "acc") == dict(enumerate(ACC[0].tolist(), 1))
    assert epoch_metrics(folds[1], "acc") == dict(enumerate(ACC[1].tolist(), 1))
    summary = fold_summary(folds)
    assert summary["best"]["epoch"] == 3 and summary["last"]["epoch"] == 4
    assert summary["best"]["mean"] == pytest.approx(ACC[:, 2].mean())
    assert summary["best"]["std"] == pytest.approx(ACC[:, 2].std(ddof=1))
    assert summary["last"]["mean"] == pytest.approx(ACC[:, 3].mean())
    assert summary["best"]["folds"] == pytest.approx(ACC[:, 2].tolist())
    assert set(summary["epochs"]) == {"1", "2", "3", "4"}
    by_map = fold_summary(folds, metric="mAP")
    assert by_map["best"]["mean"] == pytest.approx(ACC[:, 2].mean() / 2)


def test_only_epochs_every_fold_reached_count(folds: list[Path], tmp_path: Path) -> None:
    short = folds[1] / "eval" / "epoch-004_summary.json"
    short.unlink()
    summary = fold_summary(folds)
    assert summary["last"]["epoch"] == 3 and "4" not in summary["epochs"]
    with pytest.raises(FileNotFoundError, match="no per-epoch evaluations"):
        fold_summary([*folds, tmp_path / "empty"])


def test_the_command_prints_and_writes_folds_summary(folds: list[Path]) -> None:
    cmd = [sys.executable, "-m", "cmkd_scale.evaluate", "folds", *map(str, folds)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    mean, std = ACC[:, 2].mean(), ACC[:, 2].std(ddof=1)
    assert f"best epoch 3: acc {mean:.4f} ± {std:.4f} over 3 folds" in proc.stdout
    assert f"last epoch 4: acc {ACC[:, 3].mean():.4f}" in proc.stdout
    written = json.loads((folds[0].parent / "folds_summary.json").read_text())
    assert written["best"]["epoch"] == 3 and written["metric"] == "acc"
    assert written["runs"] == [str(f) for f in folds]

"""Evaluation helpers: placing gathered rows, weight averaging, export files (fast, no DALI).

The end-to-end paths (2-rank gather in the trainer, the WA and ensemble commands) run in
test_train_run.py on real shards.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cmkd_scale.config import load_config
from cmkd_scale.evaluate.averaging import average_weights, wa_paths
from cmkd_scale.evaluate.scoring import assemble, score
from cmkd_scale.models import build_model
from cmkd_scale.models.exported import EXPORT_FORMAT, Export, ExportError


def _parts(order: list[list[int]], width: int = 3) -> list[tuple[np.ndarray, ...]]:
    """Per-rank (index, probs, targets) where row i holds the value i everywhere."""
    out = []
    for idx in order:
        index = np.asarray(idx, dtype=np.int64)
        rows = np.repeat(index[:, None].astype(np.float32), width, axis=1)
        out.append((index, rows, rows))
    return out


def test_assemble_puts_every_rank_row_at_its_global_index() -> None:
    probs, targets = assemble(_parts([[4, 0, 2], [1, 3]]), num_samples=5)
    np.testing.assert_array_equal(probs[:, 0], np.arange(5))
    np.testing.assert_array_equal(targets, probs)


@pytest.mark.parametrize(
    ("order", "message"),
    [([[0, 1], [1, 2]], r"duplicated indices \[1\]"), ([[0], [2]], r"missing \[1\]")],
)
def test_assemble_refuses_duplicates_and_gaps(order: list[list[int]], message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        assemble(_parts(order), num_samples=3)


def test_score_leaves_classes_without_positives_out() -> None:
    rng = np.random.default_rng(0)
    targets = (rng.random((20, 3)) < 0.5).astype(np.float32)
    targets[:, 2] = 0  # never present
    summary, ap, auc = score(rng.random((20, 3)).astype(np.float32), targets)
    assert np.isnan(ap[2]) and np.isnan(auc[2])
    assert summary["mAP"] == pytest.approx(np.mean(ap[:2]))


def _export(path: Path, seed: int, **overrides: int) -> Path:
    cfg = load_config(
        None,
        [
            "model.name=vit_tiny_patch16_224",
            "model.fstride=16",
            "model.tstride=16",
            f"model.embed_dim={overrides.get('embed_dim', 32)}",
            "model.depth=1",
            "model.num_heads=2",
            "data.target_length=32",
        ],
    )
    torch.manual_seed(seed)
    model = build_model(cfg.model, num_classes=3, input_tdim=32)
    export = Export(
        state_dict=model.state_dict(),
        config=cfg.to_dict(),
        num_classes=3,
        class_names=["a", "b", "c"],
    )
    return export.save(path)


def test_weight_averaging_is_the_mean_of_the_epoch_students(tmp_path: Path) -> None:
    paths = [_export(tmp_path / f"epoch-00{e}.pt", seed=e) for e in (1, 2, 3)]
    averaged = average_weights(paths)
    states = [Export.load(p).state_dict for p in paths]
    for key, value in averaged.state_dict.items():
        torch.testing.assert_close(value, sum(s[key] for s in states) / 3)
    assert averaged.source_checkpoint == [str(p) for p in paths]
    saved = Export.load(averaged.save(tmp_path / "wa.pt"))
    assert saved.class_names == ["a", "b", "c"] and saved.num_classes == 3


def test_weight_averaging_refuses_different_architectures(tmp_path: Path) -> None:
    a = _export(tmp_path / "a.pt", seed=0)
    b = _export(tmp_path / "b.pt", seed=0, embed_dim=64)
    with pytest.raises(ValueError, match="different parameters"):
        average_weights([a, b])


def test_wa_range_names_the_missing_epoch_exports(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    _export(tmp_path / "models" / "epoch-001.pt", seed=0)
    with pytest.raises(FileNotFoundError, match=r"epoch-002\.pt"):
        wa_paths(tmp_path, 1, 2)
    with pytest.raises(ValueError, match="start <= end"):
        wa_paths(tmp_path, 3, 2)


def test_a_plain_state_dict_is_not_taken_for_an_export(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(ExportError, match="not a cmkd_scale export"):
        Export.load(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Export.load(tmp_path / "nope.pt")


def test_the_export_format_tag_is_checked(tmp_path: Path) -> None:
    good = _export(tmp_path / "good.pt", seed=0)
    payload = torch.load(good, weights_only=True)
    assert payload["format"] == EXPORT_FORMAT
    model = Export.load(good).model()
    assert not model.training
    for fmt in ("cmkd_scale.student/2", None):
        torch.save({**payload, "format": fmt}, tmp_path / "other.pt")
        with pytest.raises(ExportError, match=r"export format .* re-export"):
            Export.load(tmp_path / "other.pt")

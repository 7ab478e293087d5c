"""The datasets' real published metadata, when it is on this machine (never committed).

CMKD_ESC50_META=/path/to/ESC-50-master/meta/esc50.csv
CMKD_FSD50K_GT=/path/to/FSD50K.ground_truth   (vocabulary.csv, dev.csv, eval.csv)
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from cmkd_scale.prep import PrepConfig, run_prep
from cmkd_scale.prep.formats import read_inputs
from tests.fixtures.prep import tone, write_audio


def _env_path(name: str, what: str) -> Path:
    value = os.environ.get(name)
    if not value or not Path(value).exists():
        pytest.skip(f"{name} does not point to {what} (set it to run this test)")
    return Path(value)


@pytest.fixture(scope="module")
def esc50_meta() -> Path:
    return _env_path("CMKD_ESC50_META", "ESC-50's meta/esc50.csv")


@pytest.fixture(scope="module")
def fsd50k_gt() -> Path:
    return _env_path("CMKD_FSD50K_GT", "the FSD50K.ground_truth folder")


def _esc(meta: Path, **options) -> PrepConfig:
    return PrepConfig(format="esc50", segments=[meta], audio_dir=meta.parent, **options)


def test_real_esc50_csv(esc50_meta: Path) -> None:
    classes, found = read_inputs(_esc(esc50_meta))
    assert len(found.segments) == 2000 and not found.bad_lines and found.num_duplicates == 0
    assert len(classes) == 50 and all(c.index == c.target for c in classes.classes)
    assert classes.classes[0].display_name == "dog"
    assert all(s.end is None and len(s.labels) == 1 for s in found.segments)
    esc10, rows = read_inputs(_esc(esc50_meta, esc10=True))
    assert len(esc10) == 10 and len(rows.segments) == 400
    assert [c.target for c in esc10.classes] == [0, 1, 10, 11, 12, 20, 21, 38, 40, 41]
    _, train = read_inputs(_esc(esc50_meta, folds=(1, 2, 3, 4)))
    assert len(train.segments) == 1600


def test_real_esc50_prep_of_fold_1(esc50_meta: Path, tmp_path: Path) -> None:
    """Fold 1 of the real list, with audio generated for its first 5 clips: 395 missing."""
    with open(esc50_meta, newline="") as f:
        fold1 = [r for r in csv.DictReader(f) if r["fold"] == "1"]
    for row in fold1[:5]:
        write_audio(tmp_path / "audio" / row["filename"], tone(440, 5.0, 44100), 44100)
    out = tmp_path / "out"
    manifest = run_prep(
        PrepConfig(format="esc50", segments=[esc50_meta], audio_dir=tmp_path / "audio",
                   out=str(out), folds=(1,))
    )  # fmt: skip
    assert manifest["num_classes"] == 50 and manifest["num_samples"] == 5
    assert manifest["num_missing"] == len(fold1) - 5 == 395
    samples = {}
    for shard in manifest["shards"]:
        meta = json.loads((out / shard["name"].replace(".tar", ".meta.json")).read_text())
        samples.update(dict(meta["samples"]))
    assert samples == {r["filename"][:-4]: [int(r["target"])] for r in fold1[:5]}


def test_real_fsd50k_ground_truth(fsd50k_gt: Path) -> None:
    def config(segments: str, **options) -> PrepConfig:
        return PrepConfig(
            format="fsd50k", segments=[fsd50k_gt / segments],
            class_labels=fsd50k_gt / "vocabulary.csv", audio_dir=fsd50k_gt, **options,
        )  # fmt: skip

    classes, dev = read_inputs(config("dev.csv"))
    assert len(classes) == 200 and not dev.bad_lines and len(dev.segments) == 40966
    assert len(read_inputs(config("dev.csv", split="train"))[1].segments) == 36796
    assert len(read_inputs(config("dev.csv", split="val"))[1].segments) == 4170
    _, ev = read_inputs(config("eval.csv"))
    assert len(ev.segments) == 10231 and not ev.bad_lines
    assert max(len(s.labels) for s in dev.segments) > 1  # multi-label

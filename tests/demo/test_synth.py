"""The synthetic AudioSet-format dataset used by the demo and the tests."""

from __future__ import annotations

import csv

import numpy as np
import soundfile as sf

from cmkd_scale.demo.synth import bundled_class_labels, make_synthetic_audioset


def test_bundled_index_is_audioset_527():
    with open(bundled_class_labels(), newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 527
    assert rows[0]["mid"] == "/m/09x0r" and rows[0]["display_name"] == "Speech"


def test_google_csv_format_and_overlapping_labels(tmp_path):
    ds = make_synthetic_audioset(tmp_path, num_clips=20, num_classes_used=6, duration_s=1.0)
    lines = ds.segments_csv.read_text().splitlines()
    assert [line[0] for line in lines[:3]] == ["#", "#", "#"]
    assert lines[2] == "# YTID, start_seconds, end_seconds, positive_labels"
    rows = list(csv.reader(lines[3:], skipinitialspace=True))
    assert len(rows) == 20
    assert all(len(r) == 4 and len(r[0]) == 11 for r in rows)
    label_sets = [r[3].split(",") for r in rows]
    assert set().union(*label_sets) == set(ds.mids)
    assert max(len(s) for s in label_sets) > 1  # overlapping labels exist
    for clip in ds.clips:
        wave, sr = sf.read(clip.path)
        assert sr == 16000 and wave.shape == (16000,)
        assert np.abs(wave).max() < 1.0


def test_same_seed_same_data(tmp_path):
    a = make_synthetic_audioset(tmp_path / "a", num_clips=5, duration_s=0.5, seed=3)
    b = make_synthetic_audioset(tmp_path / "b", num_clips=5, duration_s=0.5, seed=3)
    assert a.segments_csv.read_text() == b.segments_csv.read_text()
    for x, y in zip(a.clips, b.clips, strict=True):
        assert x.path.read_bytes() == y.path.read_bytes()

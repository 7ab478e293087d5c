"""``python -m cmkd_scale.features``: per-key features of a shard set and its norm statistics."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from cmkd_scale.data.features import main
from cmkd_scale.data.manifest import ShardSet
from cmkd_scale.data.members import MemberReader
from cmkd_scale.data.reference import decode, kaldi_fbank, pad_or_crop
from tests.fixtures.data import NUM_CLIPS

TOLERANCE = 0.05


def _reference(shards) -> dict[str, np.ndarray]:
    """Raw Kaldi log-mel of every clip, decoded with libsndfile straight from the tars."""
    reader = MemberReader(ShardSet(str(shards)))
    out = {}
    for i in range(NUM_CLIPS):
        sample = reader.read(i)
        out[sample.key] = kaldi_fbank(decode(sample.flac)).numpy()
    return out


@pytest.mark.slow  # a fresh interpreter imports torch + DALI: ~10-30 s on 2 busy cores
def test_cli_raw_features_match_kaldi(synth_shards, tmp_path):
    out = tmp_path / "raw.npz"
    cmd = [
        sys.executable,
        "-m",
        "cmkd_scale.features",
        "--shards",
        str(synth_shards),
        "--out",
        str(out),
        "--raw",
        "--device",
        "cpu",
        "--batch",
        "4",
        "--threads",
        "1",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ref = _reference(synth_shards)
    with np.load(out) as got:
        assert sorted(got.files) == sorted(ref)
        for key, expected in ref.items():
            assert got[key].dtype == np.float32 and got[key].shape == expected.shape
            assert np.abs(got[key] - expected).max() <= TOLERANCE


def test_eval_features_are_padded_and_normalised(synth_shards, tmp_path):
    out = tmp_path / "eval.npz"
    args = [
        "--shards",
        str(synth_shards / "manifest.json"),
        "--out",
        str(out),
        "--target-length",
        "100",
        "--norm-mean",
        "-3",
        "--norm-std",
        "2",
        "--batch",
        "5",
    ]
    assert main(args) == 0
    ref = _reference(synth_shards)
    with np.load(out) as got:
        assert len(got.files) == NUM_CLIPS
        for key, raw in ref.items():
            expected = (pad_or_crop(torch.from_numpy(raw), 100).numpy() + 3) / 4
            assert got[key].shape == (100, 128)
            assert np.abs(got[key] - expected).max() <= TOLERANCE / 4


def test_stats_are_the_mean_and_std_after_padding(synth_shards, tmp_path, capsys):
    target = 200  # the 1.5 s clips have 148 frames: the zero padding counts, as in AST
    assert (
        main(
            [
                "stats",
                "--shards",
                str(synth_shards),
                "--target-length",
                str(target),
                "--json",
                str(tmp_path / "stats.json"),
                "--batch",
                "3",
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    written = json.loads((tmp_path / "stats.json").read_text())
    assert printed == written
    cells = np.stack(
        [
            pad_or_crop(torch.from_numpy(f), target).numpy()
            for f in _reference(synth_shards).values()
        ]
    ).astype(np.float64)
    assert written["clips"] == NUM_CLIPS and written["cells"] == cells.size
    assert abs(written["norm_mean"] - cells.mean()) < 1e-3
    assert abs(written["norm_std"] - cells.std(ddof=1)) < 1e-3


def test_cli_reports_a_missing_shard_set(tmp_path, caplog):
    assert main(["--shards", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.npz")]) == 2
    assert "no manifest" in caplog.text and "cmkd_scale.prep" in caplog.text
    assert not (tmp_path / "x.npz").exists()

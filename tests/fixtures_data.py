"""Fixtures and helpers for the data-pipeline tests: prep-made shards, FLAC bytes, the graph."""

from __future__ import annotations

import dataclasses
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from cmkd_scale.data.members import silent_flac
from cmkd_scale.data.pipeline import DaliRunner, FeatureSpec
from cmkd_scale.prep import run_prep
from cmkd_scale.synth import make_synthetic_audioset

SR = 16000
NUM_CLIPS = 13  # prime: uneven splits over 2 ranks and any micro batch
SHARD_SIZE = 4


def make_shards(root: Path, *, num_clips: int = NUM_CLIPS, seed: int = 0) -> Path:
    """Synthetic AudioSet clips (1-2 s) through the real prep into 4-clip shards."""
    ds = make_synthetic_audioset(root, num_clips=num_clips, duration_s=1.5, seed=seed)
    out = root / "shards"
    run_prep([ds.segments_csv], ds.class_labels_csv, ds.audio_dir, str(out), shard_size=SHARD_SIZE)
    return out


@pytest.fixture(scope="session")
def synth_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only shard set of 13 clips in 4 shards (copy it before damaging it)."""
    return make_shards(tmp_path_factory.mktemp("data_shards"))


@pytest.fixture
def shard_copy(synth_shards: Path, tmp_path: Path) -> Path:
    """A private copy of ``synth_shards`` that a test may corrupt."""
    return Path(shutil.copytree(synth_shards, tmp_path / "shards"))


def flac_bytes(wave: np.ndarray) -> np.ndarray:
    """Encode a float wave as 16 kHz mono PCM_16 FLAC (what prep writes)."""
    buf = io.BytesIO()
    sf.write(buf, wave, SR, format="FLAC", subtype="PCM_16")
    return np.frombuffer(buf.getvalue(), dtype=np.uint8).copy()


def decoded(flac: np.ndarray) -> np.ndarray:
    return sf.read(io.BytesIO(flac.tobytes()), dtype="float32")[0]


def run_graph(
    flacs: list[np.ndarray],
    spec: FeatureSpec,
    *,
    partners: list[np.ndarray | None] | None = None,
    lams: list[float] | None = None,
    anchors: list[np.ndarray] | None = None,
    shapes: list[np.ndarray] | None = None,
    device: str = "cpu",
) -> list[np.ndarray]:
    """Push encoded clips through the training graph once (one batch); features per clip.

    Without partners, lambdas and masks the training graph computes the plain features.
    """
    n = len(flacs)
    partners = partners or [None] * n
    lams = lams or [1.0] * n
    zeros = np.zeros(4, dtype=np.float32)
    inputs = (
        list(flacs),
        [p if p is not None else silent_flac() for p in partners],
        [
            np.array([lam, float(p is not None)], np.float32)
            for lam, p in zip(lams, partners, strict=True)
        ],
        anchors or [zeros] * n,
        shapes or [zeros] * n,
        [np.zeros(3, np.float32)] * n,
        [np.array([i, -1], np.int64) for i in range(n)],
    )
    runner = DaliRunner(
        spec=dataclasses.replace(spec, augment=True),
        device=device,
        batch_size=n,
        num_threads=1,
        prefetch=1,
        source=lambda: inputs,
    )
    try:
        feats, _, _ = runner.run()
    finally:
        runner.close()
    if isinstance(feats, list):
        return feats
    return list(feats.cpu().numpy())

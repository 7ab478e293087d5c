"""Shared fixtures. Real components everywhere; tiny sizes so the suite fits 2 CPU cores.

Test folders mirror the packages of cmkd_scale/. The fixtures that several folders use live in
tests/fixtures/ and are registered here once, so a test names a fixture as an argument and
never imports it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = [
    "tests.fixtures.data",  # synth_shards, shard_copy: prep-made shards
    "tests.fixtures.mlflow_server",  # mlflow_server: a real tracking server
    "tests.fixtures.slurm",  # slurm_cluster: a real one-machine SLURM cluster
    "tests.fixtures.train",  # data: shards for the end-to-end trainer runs
]

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CMKD_SHARED_DATA", ROOT.parent / "shared" / "data"))

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (AudioSet label index, eval CSV, a real clip); skips when absent."""
    if not (SHARED_DATA / "audioset" / "class_labels_indices.csv").is_file():
        pytest.skip(f"real AudioSet files not found under {SHARED_DATA} (set CMKD_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def class_labels_csv(shared_data: Path) -> Path:
    return shared_data / "audioset" / "class_labels_indices.csv"


@pytest.fixture(scope="session")
def real_clip_wav(shared_data: Path) -> Path:
    return shared_data / "audio" / "R9_ZSCveAHg_7s.wav"


@pytest.fixture(scope="session")
def real_clip_mp3(shared_data: Path) -> Path:
    return shared_data / "audio" / "R9_ZSCveAHg_7s.mp3"

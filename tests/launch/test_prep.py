"""launch/prep.sbatch as a 2-task SLURM array + the dependent finalize job, on the real cluster."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cmkd_scale.demo.synth import make_synthetic_audioset
from tests.fixtures.slurm import LAUNCH, ROOT, SlurmCluster

pytestmark = pytest.mark.slurm

SHARD_SIZE = 3  # 10 segments -> 4 shards, so each of the 2 tasks writes 2


@pytest.fixture(scope="module")
def prep_inputs(
    tmp_path_factory: pytest.TempPathFactory,
    class_labels_csv: Path,
    real_clip_wav: Path,
    real_clip_mp3: Path,
) -> list[str]:
    """prep arguments (without --out): 8 generated clips plus the real clip as WAV and MP3."""
    base = tmp_path_factory.mktemp("prep_in")
    synth = make_synthetic_audioset(
        base / "synth", num_clips=8, duration_s=1.0, class_labels_csv=class_labels_csv
    )
    # The real clip twice: its WAV under its own YTID, its MP3 under a made-up one.
    shutil.copy(real_clip_wav, synth.audio_dir / "R9_ZSCveAHg.wav")
    shutil.copy(real_clip_mp3, synth.audio_dir / "R9mp3copy00.mp3")
    real_csv = base / "real_segments.csv"
    real_csv.write_text(
        "# Segments csv (test)\n# num_ytids=2, num_segs=2\n"
        "# YTID, start_seconds, end_seconds, positive_labels\n"
        'R9_ZSCveAHg, 0.000, 7.000, "/m/09x0r,/m/04rlf"\n'
        'R9mp3copy00, 0.000, 7.000, "/m/09x0r"\n'
    )
    return [
        "--segments", str(synth.segments_csv),
        "--segments", str(real_csv),
        "--class-labels", str(class_labels_csv),
        "--audio-dir", str(synth.audio_dir),
        "--shard-size", str(SHARD_SIZE),
    ]  # fmt: skip


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def test_prep_array_matches_single_process(
    slurm_cluster: SlurmCluster,
    prep_inputs: list[str],
    tmp_path: Path,
) -> None:
    """2 array tasks + finalize write byte-identical shards, indexes and manifest."""
    single = tmp_path / "single"
    subprocess.run(
        [sys.executable, "-m", "cmkd_scale.prep", *prep_inputs, "--out", str(single)],
        check=True,
        cwd=ROOT,
        env=slurm_cluster.env,
        timeout=300,
    )

    array_out, logs = tmp_path / "array", tmp_path / "logs"
    proc = slurm_cluster.run(
        LAUNCH / "submit_prep.sh", "2", *prep_inputs, "--out", array_out,
        cwd=tmp_path, timeout=600, check=False,
    )  # fmt: skip
    # submit_prep.sh runs with CMKD_WAIT=1 below; its exit code is the finalize job's.
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{_logs(logs)}"

    want, got = _files(single), _files(array_out)
    assert sorted(got) == sorted(want)
    tars = [name for name in want if name.endswith(".tar")]
    assert len(tars) == 4
    for name in want:
        assert got[name] == want[name], f"{name} differs between the array and one process"

    task_logs = sorted(logs.glob("cmkd-prep-*_*.out"))
    assert [p.name.rsplit("_", 1)[1] for p in task_logs] == ["0.out", "1.out"]
    for i, log in enumerate(task_logs):
        text = log.read_text()
        assert f"task {i}/2 done (2 shards built)" in text, text
    (finalize_log,) = logs.glob("cmkd-prep-finalize-*.out")
    assert "finalized" in finalize_log.read_text()


def test_prep_array_failure_cancels_finalize(
    slurm_cluster: SlurmCluster,
    prep_inputs: list[str],
    tmp_path: Path,
) -> None:
    """A task that fails (bad class index) leaves no manifest: finalize is cancelled, exit != 0."""
    bad = list(prep_inputs)
    bad[bad.index("--class-labels") + 1] = str(tmp_path / "nope.csv")
    out, logs = tmp_path / "out", tmp_path / "logs"
    proc = slurm_cluster.run(
        LAUNCH / "submit_prep.sh", "2", *bad, "--out", out,
        cwd=tmp_path, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert not (out / "manifest.json").exists()
    task_logs = sorted(logs.glob("cmkd-prep-*_*.out"))
    assert len(task_logs) == 2
    for log in task_logs:
        assert "nope.csv" in log.read_text(), log.read_text()
    assert not list(logs.glob("cmkd-prep-finalize-*.out")), "finalize must not have run"


@pytest.fixture(autouse=True)
def _wait_for_finalize(slurm_cluster: SlurmCluster) -> None:
    """submit_prep.sh waits for the finalize job (and returns its exit code) with CMKD_WAIT=1."""
    slurm_cluster.env["CMKD_WAIT"] = "1"


def _logs(folder: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(folder.glob("*.out")))

"""Determinism, resume after kill -9, and SLURM-array splitting all give byte-identical output."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from cmkd_scale.demo.synth import bundled_class_labels
from cmkd_scale.prep import FinalizeError, PlanError, finalize, run_prep
from cmkd_scale.prep.cli import slurm_array_task
from tests.fixtures.prep import (
    DOG,
    MUSIC,
    SPEECH,
    prep_cli,
    tone,
    tree_digest,
    write_audio,
    write_segments_csv,
)

ROOT = Path(__file__).resolve().parents[2]
SHARD_SIZE = 3
NUM_CLIPS = 36
NUM_SHARDS = NUM_CLIPS // SHARD_SIZE


@dataclass
class Inputs:
    csv: Path
    audio: Path
    reference: Path  # one uninterrupted single-worker run
    digest: dict[str, str]

    def cli(self, out: Path, *extra: str) -> list[str]:
        return prep_cli(self.csv, self.audio, out, SHARD_SIZE, *extra)

    def run(self, out: Path, **kwargs) -> dict:
        kwargs.setdefault("shard_size", SHARD_SIZE)
        return run_prep([self.csv], bundled_class_labels(), self.audio, str(out), **kwargs)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    root = tmp_path_factory.mktemp("prep_resume")
    audio = root / "audio"
    rows = []
    formats = ("wav", "mp3", "m4a", "ogg", "flac")
    for i in range(NUM_CLIPS):
        ytid = f"clip{i:07d}"
        fmt = formats[i % len(formats)]
        if i not in (7, 20):  # two segments have no audio
            write_audio(audio / f"{ytid}.{fmt}", tone(300 + 20 * i, 1.0, 44100, channels=2), 44100)
        rows.append((ytid, 0.0, 1.0, [[SPEECH], [MUSIC, DOG], [DOG]][i % 3]))
    (audio / "clip0000011.wav").write_bytes(b"RIFF....WAVEfmt broken")  # one undecodable file
    csv_path = write_segments_csv(root / "segments.csv", rows)
    reference = root / "reference"
    inputs = Inputs(csv_path, audio, reference, {})
    inputs.run(reference)
    inputs.digest = tree_digest(reference)
    return inputs


def test_reference_run_is_what_we_expect(inputs: Inputs) -> None:
    names = set(inputs.digest)
    assert {"manifest.json", "weights.npy", "missing.csv", "failed.csv", "plan.json"} <= names
    assert len([n for n in names if n.endswith(".meta.json")]) == NUM_SHARDS
    assert "clip0000011" in (inputs.reference / "failed.csv").read_text()


def test_two_workers_give_byte_identical_output(inputs: Inputs, tmp_path: Path) -> None:
    inputs.run(tmp_path / "out", workers=2)
    assert tree_digest(tmp_path / "out") == inputs.digest


def test_rerun_on_finished_output_does_no_work(inputs: Inputs, tmp_path: Path, caplog) -> None:
    out = tmp_path / "out"
    inputs.run(out)
    stamps = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    caplog.clear()  # the first run's records are captured too when INFO is already on
    with caplog.at_level(logging.INFO, logger="cmkd_scale.prep"):
        inputs.run(out)
    assert "nothing to do" in caplog.text and "indexed" not in caplog.text
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == stamps


def test_other_inputs_into_the_same_out_are_refused(inputs: Inputs, tmp_path: Path) -> None:
    out = tmp_path / "out"
    inputs.run(out)
    with pytest.raises(PlanError, match="new --out"):
        run_prep([inputs.csv], bundled_class_labels(), inputs.audio, str(out), shard_size=5)


@pytest.fixture(scope="module")
def per_clip_reference(inputs: Inputs, tmp_path_factory) -> Path:
    """An uninterrupted run with one clip per shard (many shards: kills land mid-run)."""
    reference = tmp_path_factory.mktemp("per_clip") / "reference"
    inputs.run(reference, shard_size=1)
    return reference


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_gives_the_same_result(
    inputs: Inputs, per_clip_reference: Path, tmp_path: Path, caplog
) -> None:
    reference = per_clip_reference
    out, log = tmp_path / "out", tmp_path / "prep.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            inputs.cli(out, "--shard-size", "1"),
            cwd=ROOT,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob("shard-*.meta.json"))) < 2:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "prep never completed a shard"
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, like an OOM kill
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = len(list(out.glob("shard-*.meta.json")))
    assert 2 <= done < NUM_CLIPS, "the kill did not land mid-run"
    assert not (out / "manifest.json").exists()
    for tar in out.glob("shard-*.tar"):  # a visible tar is always a finished one
        assert tar.read_bytes() == (reference / tar.name).read_bytes(), f"partial {tar.name}"
    with caplog.at_level(logging.INFO, logger="cmkd_scale.prep"):
        inputs.run(out, shard_size=1)
    assert f"{done} already complete" in caplog.text
    assert tree_digest(out) == tree_digest(reference)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


@pytest.mark.slow
def test_slurm_array_tasks_at_once_then_finalize_equal_one_process(
    inputs: Inputs, tmp_path: Path
) -> None:
    """Two array tasks started together (both write plan.json), then the finalize command."""
    out = tmp_path / "out"
    env = {**os.environ, "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "4"}
    procs = [
        subprocess.Popen(
            inputs.cli(out),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**env, "SLURM_ARRAY_TASK_ID": str(task)},
        )
        for task in (4, 5)
    ]
    logs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)
    for i, log in enumerate(logs):
        assert f"task {i}/2 owns {NUM_SHARDS // 2} shards" in log and "prep finalize" in log
    assert not (out / "manifest.json").exists()
    fin = subprocess.run(
        [sys.executable, "-m", "cmkd_scale.prep", "finalize", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert fin.returncode == 0, fin.stderr
    assert tree_digest(out) == inputs.digest
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_in_process_split_with_explicit_task_ids(inputs: Inputs, tmp_path: Path) -> None:
    out = tmp_path / "out"
    for task in (2, 0):
        summary = inputs.run(out, num_tasks=3, task_id=task)
        assert summary["shards_built"] == list(range(task, NUM_SHARDS, 3))
    with pytest.raises(
        FinalizeError, match=r"4 of 12 shards not complete: shard-000001, shard-0000"
    ):
        finalize(str(out))
    inputs.run(out, num_tasks=3, task_id=1)
    finalize(str(out))
    assert tree_digest(out) == inputs.digest


def test_slurm_array_environment(monkeypatch) -> None:
    for name in (
        "SLURM_ARRAY_TASK_COUNT",
        "SLURM_ARRAY_TASK_ID",
        "SLURM_ARRAY_TASK_MIN",
        "SLURM_ARRAY_TASK_STEP",
    ):
        monkeypatch.delenv(name, raising=False)
    assert slurm_array_task() is None
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_STEP", "2")  # --array=1-7:2 -> ids 1,3,5,7
    assert slurm_array_task() == (4, 3)


def test_shard_tars_have_fixed_metadata(inputs: Inputs) -> None:
    with tarfile.open(inputs.reference / "shard-000000.tar") as tar:
        members = tar.getmembers()
    assert [m.name.rsplit(".", 1)[1] for m in members[:3]] == ["flac", "json", "labels"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {
        (0, 0, 0, "", "", 0o644)
    }


def test_missing_marker_rebuilds_that_shard_and_stale_temps_go(
    inputs: Inputs, tmp_path: Path, caplog
) -> None:
    out = tmp_path / "out"
    shutil.copytree(inputs.reference, out)
    (out / "shard-000001.meta.json").unlink()  # killed after the tar, before its marker
    (out / "shard-000001.tar").write_bytes(b"stale bytes of an older attempt")
    (out / "manifest.json").unlink()
    (out / ".shard-000001.tar.999-deadbeef.tmp").write_bytes(b"partial")
    (out / ".manifest.json.999-deadbeef.tmp").write_bytes(b"partial")
    with caplog.at_level(logging.INFO, logger="cmkd_scale.prep"):
        inputs.run(out)
    assert f"{NUM_SHARDS - 1} already complete" in caplog.text
    assert "removed 1 temporary files left by a killed run" in caplog.text
    assert tree_digest(out) == inputs.digest
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]

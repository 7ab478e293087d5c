"""A file that crashes (or hangs) its decoder process costs that clip only; a kill from outside
costs nothing.

Crashes are real: the decoder process kills itself with a signal before decoding the named
file (the CMKD_PREP_CRASH_ON fault-injection hook in cmkd_scale.prep.clip), or the test kills
a decoder process from outside.  Everything else is the real prep.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from cmkd_scale.demo.synth import bundled_class_labels
from cmkd_scale.prep import WorkerDied, decoders, run_prep, verify
from cmkd_scale.prep.clip import ClipJob, process_clip
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
CULPRIT = "clip0000004"  # an m4a in the middle of shard 1: PyAV would be the crashing decoder
SEGV_REASON = "the decoder process died (signal 11 SIGSEGV) on this file"


@dataclass
class Inputs:
    csv: Path
    audio: Path
    clean: Path  # a run where nothing crashed
    shard_size: int

    # input order (--keep-order), so the culprit sits in the middle of shard 1
    def cli(self, out: Path, *extra: str) -> list[str]:
        return prep_cli(self.csv, self.audio, out, self.shard_size, "--keep-order", *extra)

    def run(self, out: Path, audio: Path | None = None, **kwargs) -> dict:
        audio = audio or self.audio
        return run_prep(
            [self.csv],
            bundled_class_labels(),
            audio,
            str(out),
            shard_size=self.shard_size,
            keep_order=True,
            **kwargs,
        )


def make_inputs(root: Path, num_clips: int, formats: tuple[str, ...], shard_size: int) -> Inputs:
    """``num_clips`` 1 s stereo tones in rotating formats, a segment CSV and a clean run."""
    audio, rows = root / "audio", []
    for i in range(num_clips):
        ytid = f"clip{i:07d}"
        wave = tone(300 + 25 * i, 1.0, 44100, channels=2)
        write_audio(audio / f"{ytid}.{formats[i % len(formats)]}", wave, 44100)
        rows.append((ytid, 0.0, 1.0, [[SPEECH], [MUSIC, DOG], [DOG]][i % 3]))
    csv_path = write_segments_csv(root / "segments.csv", rows)
    inputs = Inputs(csv_path, audio, root / "clean", shard_size)
    inputs.run(inputs.clean)
    return inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    return make_inputs(
        tmp_path_factory.mktemp("prep_crash"), 9, ("wav", "mp3", "wav", "wav", "m4a"), SHARD_SIZE
    )


@pytest.fixture(scope="module")
def unreadable(inputs: Inputs, tmp_path_factory) -> Path:
    """A run where the culprit file is simply unreadable (it fails the ordinary way)."""
    root = tmp_path_factory.mktemp("unreadable")
    shutil.copytree(inputs.audio, root / "audio")
    (root / "audio" / f"{CULPRIT}.m4a").write_bytes(b"not audio at all")
    inputs.run(root / "out", audio=root / "audio")
    return root / "out"


@pytest.fixture(scope="module")
def crashed_cli(inputs: Inputs, tmp_path_factory) -> tuple[Path, str]:
    """The command line with one worker, the culprit crashing its decoder with SIGSEGV."""
    out = tmp_path_factory.mktemp("crashed_cli") / "out"
    env = {**os.environ, "CMKD_PREP_CRASH_ON": CULPRIT}
    proc = subprocess.run(
        inputs.cli(out, "--workers", "1"), cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    return out, proc.stderr


def failed_rows(out: Path) -> list[dict]:
    with open(out / "failed.csv", newline="") as f:
        return list(csv.DictReader(f))


def _meta(out: Path, j: int) -> dict:
    return json.loads((out / f"shard-{j:06d}.meta.json").read_text())


def _keys(out: Path) -> list[str]:
    """Every sample key in global order."""
    return [key for j in range(3) for key, _ in _meta(out, j)["samples"]]


def test_a_crash_with_one_worker_is_recorded_and_prep_finishes(
    inputs: Inputs, crashed_cli: tuple[Path, str]
) -> None:
    out, stderr = crashed_cli
    rows = failed_rows(out)
    assert [(r["ytid"], r["audio"], r["reason"]) for r in rows] == [
        (CULPRIT, f"{CULPRIT}.m4a", SEGV_REASON)
    ]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 8 and manifest["num_failed"] == 1
    clean = json.loads((inputs.clean / "manifest.json").read_text())
    assert clean["num_samples"] == 9 and clean["num_failed"] == 0
    assert _keys(out) == [k for k in _keys(inputs.clean) if k != f"{CULPRIT}_0"]
    where = f"shard-000001 key {CULPRIT}_0 (file {CULPRIT}.m4a)"
    first, again = (
        f"WARNING cmkd_scale.prep.decoders: a decoder process died (signal 11 SIGSEGV) on {where}",
        f"died again (signal 11 SIGSEGV) decoding {where} alone: recorded as failed",
    )
    assert first in stderr and again in stderr, stderr
    assert (
        "files that crashed their decoder process: 1 (in failed.csv)" in stderr
        and "1 failed" in stderr
    )
    check = subprocess.run(
        [sys.executable, "-m", "cmkd_scale.prep", "verify", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_crash_gives_the_bytes_of_an_ordinary_failure(
    crashed_cli: tuple[Path, str], unreadable: Path
) -> None:
    """Same tars, indexes, weights and manifest; meta and failed.csv differ only in the reason."""
    out, _ = crashed_cli
    crashed, plain = tree_digest(out), tree_digest(unreadable)
    assert crashed.keys() == plain.keys()
    differ = sorted(name for name in crashed if crashed[name] != plain[name])
    assert differ == ["failed.csv", "shard-000001.meta.json"]
    (plain_row,) = failed_rows(unreadable)
    assert plain_row["reason"] != SEGV_REASON  # an ordinary decode error message
    assert failed_rows(out) == [{**plain_row, "reason": SEGV_REASON}]
    meta = _meta(unreadable, 1)
    meta["failed"][0]["reason"] = SEGV_REASON
    assert _meta(out, 1) == meta


def test_a_crash_with_two_workers_gives_the_same_bytes(
    inputs: Inputs, crashed_cli: tuple[Path, str], tmp_path: Path, monkeypatch, caplog
) -> None:
    monkeypatch.setenv("CMKD_PREP_CRASH_ON", CULPRIT)  # spawned decoders inherit it
    with caplog.at_level(logging.WARNING, logger="cmkd_scale.prep"):
        inputs.run(tmp_path / "out", workers=2)
    assert tree_digest(tmp_path / "out") == tree_digest(crashed_cli[0])
    assert verify(str(tmp_path / "out")) == []
    assert "recorded as failed" in caplog.text


def test_a_one_off_kill_on_a_good_file_marks_nothing_failed(
    inputs: Inputs, tmp_path: Path, monkeypatch, caplog
) -> None:
    """The OOM killer's SIGKILL while decoding a file that then decodes fine alone."""
    marker = tmp_path / "killed-once"
    monkeypatch.setenv("CMKD_PREP_CRASH_ON", CULPRIT)
    monkeypatch.setenv("CMKD_PREP_CRASH_SIGNAL", "SIGKILL")
    monkeypatch.setenv("CMKD_PREP_CRASH_ONCE", str(marker))
    with caplog.at_level(logging.INFO, logger="cmkd_scale.prep"):
        inputs.run(tmp_path / "out", workers=2)
    assert marker.exists(), "the decoder was never killed"
    assert "died (signal 9 SIGKILL) on shard-000001" in caplog.text
    assert f"{CULPRIT}.m4a) decodes fine alone" in caplog.text
    assert tree_digest(tmp_path / "out") == tree_digest(inputs.clean)


HANG_REASON = (
    "the decoder process died (no answer within 3 s (--decode-timeout): hung, killed) on this file"
)


def test_a_hung_decoder_is_killed_and_its_file_recorded(
    inputs: Inputs, unreadable: Path, tmp_path: Path
) -> None:
    """A decoder stuck on a file (it never answers) is killed after --decode-timeout, the file
    is tried once more alone, then recorded; the output is that of an ordinary failure."""
    out = tmp_path / "out"
    env = {**os.environ, "CMKD_PREP_CRASH_ON": CULPRIT, "CMKD_PREP_CRASH_SIGNAL": "HANG"}
    started = time.monotonic()
    proc = subprocess.run(
        inputs.cli(out, "--workers", "2", "--decode-timeout", "3"),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started >= 6  # two full timeouts: first try, then alone
    assert [r["reason"] for r in failed_rows(out)] == [HANG_REASON]
    where = f"shard-000001 key {CULPRIT}_0 (file {CULPRIT}.m4a)"
    assert f"hung, killed) on {where}; decoding it again alone" in proc.stderr, proc.stderr
    hung, plain = tree_digest(out), tree_digest(unreadable)
    assert sorted(n for n in hung if hung[n] != plain[n]) == [
        "failed.csv",
        "shard-000001.meta.json",
    ]
    assert verify(str(out)) == []


def test_a_decoder_hung_once_costs_nothing(inputs: Inputs, tmp_path: Path, monkeypatch) -> None:
    """Hung once (e.g. stalled storage), the retry alone decodes it: nothing is failed."""
    marker = tmp_path / "hung-once"
    monkeypatch.setenv("CMKD_PREP_CRASH_ON", CULPRIT)
    monkeypatch.setenv("CMKD_PREP_CRASH_SIGNAL", "HANG")
    monkeypatch.setenv("CMKD_PREP_CRASH_ONCE", str(marker))
    inputs.run(tmp_path / "out", decode_timeout_s=2.0)
    assert marker.exists(), "the decoder never hung"
    assert tree_digest(tmp_path / "out") == tree_digest(inputs.clean)


def test_a_nonpositive_decode_timeout_is_refused(inputs: Inputs, tmp_path: Path) -> None:
    proc = subprocess.run(
        inputs.cli(tmp_path / "out", "--decode-timeout", "0"),
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "--decode-timeout must be > 0 seconds, got 0.0" in proc.stderr


@pytest.mark.slow
def test_every_clip_crashing_stops_prep_before_blaming_any(
    inputs: Inputs, tmp_path: Path, monkeypatch
) -> None:
    """When even a lone clip always kills its process, the machine is broken, not the files."""
    out = tmp_path / "out"
    monkeypatch.setattr(decoders, "MAX_CRASHES_IN_A_ROW", 2)  # fewer process starts
    monkeypatch.setenv("CMKD_PREP_CRASH_ON", "clip")  # every file
    monkeypatch.setenv("CMKD_PREP_CRASH_SIGNAL", "SIGABRT")
    with pytest.raises(WorkerDied) as err:
        inputs.run(out)
    message = str(err.value)
    assert message.startswith("while shard-000000 was being built: 2 clips in a row crashed")
    assert "(signal 6 SIGABRT)" in message and "rerun the same command" in message
    assert not list(out.glob("*.meta.json")), "an innocent clip was recorded as failed"
    monkeypatch.delenv("CMKD_PREP_CRASH_ON")
    inputs.run(out)  # the machine is fixed: the rerun completes everything
    assert tree_digest(out) == tree_digest(inputs.clean)


@pytest.mark.slow
def test_a_decoder_killed_from_outside_costs_nothing(tmp_path: Path) -> None:
    """kill -9 of a decoder process mid-run: prep carries on and the output is the clean one."""
    inputs = make_inputs(tmp_path / "in", 24, ("wav",), 1)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        inputs.cli(out, "--workers", "2"),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "shard-000000.meta.json").exists():  # decoders are up and busy
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGSTOP)  # hold prep still so the kill lands mid-run
        while psutil.Process(proc.pid).status() != psutil.STATUS_STOPPED:  # the signal is async
            time.sleep(0.001)
        done = len(list(out.glob("shard-*.meta.json")))
        lanes = [
            c for c in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(c.cmdline())
        ]
        assert len(lanes) == 2 and done < 24, f"{len(lanes)} decoders, {done} shards done"
        lanes[0].kill()
        while not _dead(lanes[0]):  # prep (stopped) reaps it later
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGCONT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    # starting, idle or busy: where the kill lands varies; no state of a decoder loses a clip
    assert "WARNING cmkd_scale.prep.decoders: a" in stderr and "(signal 9 SIGKILL)" in stderr
    _, alive = psutil.wait_procs(lanes, timeout=10)
    assert not alive, "decoder processes outlived prep"
    assert tree_digest(out) == tree_digest(inputs.clean)


def _dead(process: psutil.Process) -> bool:
    """Killed: a zombie not yet reaped, or already gone."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_exit_status_names_the_signal() -> None:
    assert decoders.describe_exit(-11) == "signal 11 SIGSEGV"
    assert decoders.describe_exit(-6) == "signal 6 SIGABRT"
    assert decoders.describe_exit(1) == "exit code 1"


def test_the_crash_hook_never_fires_in_the_calling_process(tmp_path: Path, monkeypatch) -> None:
    path = write_audio(tmp_path / f"{CULPRIT}.wav", tone(440, 0.5, 16000), 16000)
    monkeypatch.setenv("CMKD_PREP_CRASH_ON", CULPRIT)
    assert process_clip(ClipJob(0, str(path), 0.0, 0.5)).error is None

"""Faults a week-long run meets, on real 2-rank CPU runs (issue 17).

- a pickle that runs code, given to every command and config key that takes a checkpoint:
  never executed (its marker file stays absent), a clear error;
- the newest checkpoint truncated / a file deleted / a save cut short: the run resumes from the
  previous intact checkpoint with the same losses as an uninterrupted run;
- kill -9 or SIGSTOP of one rank under ``python -m cmkd_scale.train.launch`` (torchrun
  --max-restarts): the attempt ends within a measured bound, restarts by itself and finishes
  with the uninterrupted run's losses; with ``run.max_restarts=0`` it stops with a summary;
- a 6 MB filesystem as run.dir (tmpfs, root only): one clear message, no traceback, nothing
  half-written; after the space is back the run resumes and finishes.

All runs: debug_cpu.yaml, random-weight teacher, ZeRO-2, 6 steps (4 per epoch), a checkpoint
every 2 steps. The restart runs pass on SLURM too: tests/launch/test_train_faults.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from tests.fixtures.train import (  # the `data` fixture comes from there, via conftest.py
    ROOT,
    free_port,
    jsonl,
    run_cmd,
    srun_like,
    step_losses,
    torchrun,
    train_args,
    train_env,
    wait_all,
)

pytestmark = pytest.mark.slow

COMMON = (
    "teacher.name=random:efficientnet_b0",
    "teacher.checkpoint=",
    "deepspeed.zero_stage=2",
    "run.max_steps=6",
    "run.checkpoint_every_steps=2",
    "run.record_samples=true",
)
# measured on the 2-core CI VM (loaded): a rank ends 0.3 s after its peer is killed; a hung
# peer is noticed after run.collective_timeout_s (20 s here)
KILL_BOUND_S = 10.0
TIMEOUT_S = 20


@pytest.fixture(scope="module")
def reference(data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run: 6 steps on 2 ranks."""
    run_dir = tmp_path_factory.mktemp("fault_ref") / "run"
    torchrun(run_dir, data, *COMMON)
    return run_dir


def _assert_same_losses(run_dir: Path, reference: Path, steps: range | None = None) -> None:
    want, got = step_losses(reference), step_losses(run_dir)
    assert sorted(got) == sorted(want) == list(range(1, 7))
    for step in steps or range(1, 7):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step


# ----------------------------------------------------------------------- payload pickles


class _Payload:
    """Unpickling this calls open(marker, "w"): the file appears if the pickle ever runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def _evil(path: Path, marker: Path, *, export_like: bool) -> Path:
    payload: object = _Payload(marker)
    if export_like:  # shaped like our export, with the payload hidden in a value
        payload = {"format": "cmkd_scale.student/1", "model": {}, "config": payload}
    torch.save(payload, path)
    return path


def test_payload_pickles_never_run(data: dict[str, Path], reference: Path, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    evil = _evil(tmp_path / "evil.pt", marker, export_like=True)
    bare = _evil(tmp_path / "bare.pth", marker, export_like=False)
    clip = tmp_path / "clip.wav"
    sf.write(clip, np.zeros(16000, dtype=np.float32), 16000)
    wa_run = tmp_path / "wa_run"
    (wa_run / "models").mkdir(parents=True)
    (wa_run / "config.yaml").write_text((reference / "config.yaml").read_text())
    for epoch in (1, 2):
        _evil(wa_run / "models" / f"epoch-00{epoch}.pt", marker, export_like=True)
    good = reference / "models" / "final.pt"
    py = [sys.executable, "-m"]
    commands = {
        "evaluate --checkpoint": [*py, "cmkd_scale.evaluate", "--checkpoint", evil],
        "evaluate ensemble": [*py, "cmkd_scale.evaluate", "--checkpoint", good, "--checkpoint",
                              evil],
        "evaluate --wa": [*py, "cmkd_scale.evaluate", "--wa", wa_run],
        "infer export": [*py, "cmkd_scale.infer", "--checkpoint", evil, clip],
        "infer released": [*py, "cmkd_scale.infer", "--checkpoint", bare, "--arch", "ast", clip],
        "export": [*py, "cmkd_scale.export", "--checkpoint", evil, "--out", tmp_path / "x.onnx"],
        "train teacher.checkpoint": [sys.executable, *train_args(
            tmp_path / "t1", data, *COMMON[2:], "teacher.name=efficientnet_b0",
            f"teacher.checkpoint={evil}")],
        "train model.checkpoint": [sys.executable, *train_args(
            tmp_path / "t2", data, *COMMON, f"model.checkpoint={bare}")],
    }  # fmt: skip
    procs = {
        name: subprocess.Popen(
            [str(c) for c in cmd],
            cwd=tmp_path,
            env=train_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, cmd in commands.items()
    }
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode != 0, f"{name} accepted a payload pickle:\n{out[-3000:]}"
        assert "was refused: it names 'io.open', which torch.load would call" in out, (
            f"{name}:\n{out[-3000:]}"
        )
    assert not marker.exists(), "a payload pickle ran"


def test_payload_in_the_run_dir_is_refused_on_resume(
    data: dict[str, Path], reference: Path, tmp_path: Path
) -> None:
    """Even inside a run dir, with a manifest that matches, a checkpoint file runs no code:
    the trainer state loads weights-only, DeepSpeed's files through an allow-list."""
    from cmkd_scale.train import integrity

    marker = tmp_path / "PWNED"
    for victim in ("trainer-rank0.pt", "mp_rank_00_model_states.pt"):
        run_dir = tmp_path / victim / "run"
        (run_dir / "checkpoints").mkdir(parents=True)
        src = reference / "checkpoints" / (reference / "checkpoints" / "latest").read_text()
        tag_dir = run_dir / "checkpoints" / src.name
        subprocess.run(["cp", "-r", src, tag_dir], check=True)
        _evil(tag_dir / victim, marker, export_like=False)
        manifest = json.loads((tag_dir / integrity.MANIFEST).read_text())
        manifest["files"][victim] = {
            "bytes": (tag_dir / victim).stat().st_size,
            "sha256": integrity.sha256_file(tag_dir / victim),
        }
        (tag_dir / integrity.MANIFEST).write_text(json.dumps(manifest))
        proc = _torchrun_proc(run_dir, data, *COMMON)
        assert proc.returncode != 0, proc.stderr[-3000:]
        assert "Unsupported global: GLOBAL io.open" in proc.stderr, proc.stderr[-3000:]
    assert not marker.exists(), "a payload pickle ran"


def _torchrun_proc(run_dir: Path, data: dict[str, Path], *overrides: str):
    """``torchrun`` of 2 ranks that may fail (tests.fixtures.train.torchrun asserts success)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        *train_args(run_dir, data, *overrides),
    ]  # fmt: skip
    return run_cmd(cmd)


# ------------------------------------------------------------------ broken checkpoints


def test_broken_newest_checkpoints_fall_back_to_the_intact_one(
    data: dict[str, Path], reference: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    torchrun(run_dir, data, *COMMON[:3], "run.max_steps=4", *COMMON[4:])
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text() == "epoch-001"  # step 4 ends epoch 1
    # the newest two are broken (one file truncated, one deleted); a save was cut short
    mp = ckpts / "epoch-001" / "mp_rank_00_model_states.pt"
    mp.write_bytes(mp.read_bytes()[:1000])
    (ckpts / "step-000004" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    (ckpts / "step-000006").mkdir()
    (ckpts / "step-000006" / "trainer-rank0.pt").write_bytes(b"half")

    proc = torchrun(run_dir, data, *COMMON)
    log = proc.stderr
    assert "checkpoint epoch-001 is corrupt (mp_rank_00_model_states.pt has 1000 bytes" in log
    assert (
        "checkpoint step-000004 is corrupt (zero_pp_rank_1_mp_rank_00_optim_states.pt is "
        "missing)" in log
    )
    assert "checkpoint step-000006 is incomplete (no manifest" in log
    assert "resumed from step-000002: epoch 1, step 2" in log
    assert (ckpts / "epoch-001.corrupt").is_dir() and (ckpts / "step-000004.corrupt").is_dir()
    # every checkpoint left is whole, and a rerun would not meet the broken ones again
    for tag_dir in ckpts.iterdir():
        if tag_dir.is_dir() and not tag_dir.name.endswith(".corrupt"):
            assert (tag_dir / "manifest.json").is_file(), tag_dir
    _assert_same_losses(run_dir, reference)


# ------------------------------------------------------------------------- restarts


def _launch(run_dir: Path, data: dict[str, Path], *overrides: str) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "cmkd_scale.train.launch", "--nproc-per-node", "2",
        "--shutdown-timeout", "5", *train_args(run_dir, data, *COMMON, *overrides)[2:],
    ]  # fmt: skip
    log = open(run_dir.parent / "launch.log", "w")  # noqa: SIM115
    return subprocess.Popen(cmd, cwd=ROOT, env=train_env(), stdout=log, stderr=log)


def _rank_pids(run_dir: Path) -> dict[int, int]:
    """The trainer processes of ``run_dir`` by RANK (read from /proc)."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            if b"cmkd_scale.train\0" not in cmdline or f"run.dir={run_dir}".encode() not in cmdline:
                continue
            env = dict(
                kv.split(b"=", 1)
                for kv in (proc / "environ").read_bytes().split(b"\0")
                if b"=" in kv
            )
            if b"RANK" in env and _alive(int(proc.name)):
                out[int(env[b"RANK"])] = int(proc.name)
        except (OSError, ValueError):
            continue
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return False


def _strike(proc: subprocess.Popen, run_dir: Path, sig: int) -> tuple[dict[int, int], float]:
    """Once rank 1 has taken step 3 (after the step-2 checkpoint), send ``sig`` to it; returns
    the pids and the seconds until rank 0 was gone."""
    samples = run_dir / "samples" / "rank1.jsonl"
    deadline = time.monotonic() + 400
    while not (samples.is_file() and len(samples.read_text().splitlines()) >= 3):
        assert proc.poll() is None, (run_dir.parent / "launch.log").read_text()[-4000:]
        assert time.monotonic() < deadline, "the run never reached step 3"
        time.sleep(0.1)
    pids = _rank_pids(run_dir)
    assert set(pids) == {0, 1}, pids
    start = time.monotonic()
    os.kill(pids[1], sig)
    while _alive(pids[0]):
        assert time.monotonic() - start < 120, "rank 0 did not end"
        time.sleep(0.05)
    return pids, time.monotonic() - start


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["kill-9", "sigstop"])
def test_a_lost_rank_ends_the_attempt_and_the_job_restarts(
    data: dict[str, Path], reference: Path, tmp_path: Path, sig: int
) -> None:
    run_dir = tmp_path / "run"
    proc = _launch(run_dir, data, "run.max_restarts=2", f"run.collective_timeout_s={TIMEOUT_S}")
    try:
        pids, ended_s = _strike(proc, run_dir, sig)
        rc = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "launch.log").read_text()
    print(f"{signal.Signals(sig).name}: rank 0 ended {ended_s:.1f} s after rank 1 was hit")
    if sig == signal.SIGKILL:
        assert ended_s < KILL_BOUND_S, log[-4000:]
    else:  # the collective timeout, not before
        assert TIMEOUT_S - 1 <= ended_s < TIMEOUT_S + KILL_BOUND_S, log[-4000:]
    assert rc == 0, log[-6000:]
    assert "[rank 0]: another rank is gone or hung at step" in log
    assert "attempt 2 (torchrun job" in log
    # the newest checkpoint saved before the rank was lost (step 2, or step 4 when rank 1 got
    # there before the signal: steps of the tiny model take milliseconds)
    saved = re.findall(r"\[rank 0\]: checkpoint (step-0*(\d+)) saved", log.split("another rank")[0])
    tag, step = saved[-1]
    assert f"[rank 0]: resumed from {tag}: epoch 1, step {step}" in log, log[-4000:]
    failures = jsonl(run_dir / "failures.jsonl")
    assert [(f["rank"], f["kind"]) for f in failures] == [(0, "rank_lost")], failures
    assert not any(_alive(p) for p in pids.values())
    _assert_same_losses(run_dir, reference)


def test_restarts_used_up_stop_with_a_summary(data: dict[str, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _launch(run_dir, data, "run.max_restarts=0")
    try:
        _strike(proc, run_dir, signal.SIGKILL)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "launch.log").read_text()
    assert rc != 0
    assert "run.max_restarts=0 is used up, not restarting" in log, log[-4000:]
    assert re.search(r"rank 0 at step \d: rank_lost: .*Connection (closed|reset) by peer", log), (
        log[-4000:]
    )
    assert "the ranks ended with exit code" in log
    assert "attempt 2" not in log


# ---------------------------------------------------------------------- a full disk


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 6 MB tmpfs (root only); yields (mount point, a function that resizes it)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], check=True)

    def resize(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True)

    try:
        yield mnt, resize
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_is_one_message_then_the_run_resumes(
    data: dict[str, Path], reference: Path, small_fs
) -> None:
    from cmkd_scale.train.restarts import EXIT_NO_SPACE

    run_dir, resize = small_fs  # the ranks' logs go beside it, not onto it
    logs_of = [run_dir.parent / f"{run_dir.name}-rank{r}.log" for r in (0, 1)]
    codes = wait_all(srun_like(run_dir, data, *COMMON))
    logs = [log.read_text() for log in logs_of]
    assert codes == [EXIT_NO_SPACE, EXIT_NO_SPACE], logs[0][-4000:]
    # the free-space check before a checkpoint, or a write that failed (the export of the
    # epoch, when the checkpoint still fitted): one message, the same on both ranks
    said = re.compile(
        r"(not written|failed \(no space left on device.*\)): it needs about [\d.]+ [kM]B"
        rf".*free on the filesystem of {re.escape(str(run_dir))}/(checkpoints|models)"
    )
    for text in logs:
        assert "Traceback" not in text, text[-4000:]
        assert said.search(text), text[-4000:]
    # nothing half-written: every checkpoint left is whole, `latest` names one of them
    ckpts = run_dir / "checkpoints"
    tags = [p for p in ckpts.iterdir() if p.is_dir()]
    assert tags and all((p / "manifest.json").is_file() for p in tags), tags
    assert (ckpts / (ckpts / "latest").read_text()).is_dir()
    assert not list((run_dir / "models").glob(".*.tmp"))

    # started again on the full disk (a requeue): it stops at once, before training a step
    for log in logs_of:
        log.write_text("")
    codes = wait_all(srun_like(run_dir, data, *COMMON))
    text = logs_of[0].read_text()
    assert codes == [EXIT_NO_SPACE, EXIT_NO_SPACE], text[-4000:]
    assert "not resuming: the next checkpoint would not fit on the disk" in text, text[-4000:]
    assert not re.search(r"epoch \d+ step \d+/\d+ loss", text), text[-4000:]  # no step taken

    resize("64m")
    codes = wait_all(srun_like(run_dir, data, *COMMON))
    assert codes == [0, 0], logs_of[0].read_text()[-4000:]
    _assert_same_losses(run_dir, reference)


def test_torch_save_on_a_full_disk_says_so(tmp_path: Path) -> None:
    """The write path itself (not the free-space check): torch's C++ writer fails with
    'basic_ios::clear' or 'file write failed'; the message names path, need and free space."""
    from cmkd_scale.diskspace import StorageError, explain_storage_errors

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        with (
            pytest.raises(StorageError) as caught,
            explain_storage_errors("export", mnt / "x.pt", needed=8_000_000),
        ):
            torch.save(torch.zeros(2_000_000), mnt / "x.pt")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    text = str(caught.value)
    assert text.startswith(f"export: writing {mnt / 'x.pt'} failed (no space left on device")
    assert "it needs about 8.0 MB" in text and f"free on the filesystem of {mnt}" in text


def test_the_tracking_journal_on_a_full_disk_says_so(tmp_path: Path) -> None:
    """MLflow's local journal (every metric goes through it) on a full disk: one message."""
    from cmkd_scale.diskspace import StorageError
    from cmkd_scale.tracking.journal import Journal

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    try:
        journal = Journal(mnt)
        with pytest.raises(StorageError) as caught:
            for step in range(100_000):
                journal.write("metrics", step=step, values={"loss": 0.5, "pad": "x" * 200})
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    text = str(caught.value)
    assert text.startswith(f"tracking journal: writing {journal.path} failed (no space left")
    assert "it needs about" in text and "free on the filesystem of" in text

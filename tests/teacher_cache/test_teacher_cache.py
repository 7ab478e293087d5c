"""Teacher once, students many: the cache pass and students trained from it, end to end.

Real prep shards, the real DALI CPU loader, a real EfficientNet teacher trained by the same
trainer, DeepSpeed over gloo with 2 ranks; every run is a subprocess started as in production.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cmkd_scale.config import load_config
from cmkd_scale.distill.logit_cache import CacheError, open_cached_teacher
from tests.fixtures.slurm import LAUNCH, SlurmCluster
from tests.fixtures.train import (  # the `data` fixture comes from there, via conftest.py
    CONFIG,
    ROOT,
    free_port,
    jsonl,
    run_cmd,
    srun_like,
    step_losses,
    torchrun,
    train_args,
    train_cnn_teacher,
    train_env,
    wait_all,
)

pytestmark = pytest.mark.slow

VIEWS = 3
STEPS = 6  # 2 ranks x micro batch 4 on 32 clips: 4 steps per epoch, so the run crosses one


@pytest.fixture(scope="module")
def teacher(data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained EfficientNet-B0 export (the teacher of every run here)."""
    run_dir = train_cnn_teacher(tmp_path_factory.mktemp("cache_teacher") / "run", data, steps=4)
    return run_dir / "models" / "final.pt"


def _kd(teacher: Path) -> tuple[str, ...]:
    """The KD student's settings: views, mixup on, the teacher, ZeRO-2."""
    return (
        f"data.views={VIEWS}",
        "data.mixup=0.5",
        f"teacher.checkpoint={teacher}",
        "deepspeed.zero_stage=2",
        f"run.max_steps={STEPS}",
        "run.record_samples=true",
        "run.checkpoint_every_steps=2",
    )


def _pass_cmd(data: dict[str, Path], teacher: Path, out: Path, *extra: str) -> list[str]:
    """The cache pass's arguments (after `-m`)."""
    return [
        "cmkd_scale.teacher_cache",
        "--config",
        str(CONFIG),
        "--out",
        str(out),
        "--views-per-file",
        "1",
        "--batch-size",
        "4",
        *extra,
        f"data.train={data['train']}",
        f"data.views={VIEWS}",
        "data.mixup=0.5",
        f"teacher.checkpoint={teacher}",
    ]


@pytest.fixture(scope="module")
def cache(data: dict[str, Path], teacher: Path, tmp_path_factory) -> Path:
    """The cache pass on 2 ranks (torchrun), uninterrupted: full fp16 logits."""
    out = tmp_path_factory.mktemp("cache") / "full"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m",
           *_pass_cmd(data, teacher, out)]  # fmt: skip
    proc = run_cmd(cmd)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "bytes per clip per view" in proc.stdout
    return out


@pytest.fixture(scope="module")
def online_run(data: dict[str, Path], teacher: Path, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("online") / "run"
    torchrun(run_dir, data, *_kd(teacher))
    return run_dir


@pytest.fixture(scope="module")
def cached_run(data: dict[str, Path], teacher: Path, cache: Path, tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("cached") / "run"
    proc = torchrun(run_dir, data, *_kd(teacher), f"teacher.cache={cache}")
    return {"run_dir": run_dir, "log": proc.stderr}


def _records(run_dir: Path) -> list[dict]:
    return [r for r in jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    export = torch.load(run_dir / "models" / "final.pt", weights_only=False)
    return {k: v.float() for k, v in export["model"].items() if v.is_floating_point()}


def test_students_from_the_cache_equal_students_taught_online(
    online_run: Path, cached_run: dict
) -> None:
    """Same views, same teacher: per-step KD losses and the student's weights after 6 steps
    equal the online run's to the fp16 precision of the cached logits."""
    assert "the teacher is not built" in cached_run["log"]
    online, cached = _records(online_run), _records(cached_run["run_dir"])
    assert [r["step"] for r in cached] == [r["step"] for r in online] == list(range(1, 7))
    for a, b in zip(online, cached, strict=True):
        assert b["kd_loss"] > 0
        assert b["kd_loss"] == pytest.approx(a["kd_loss"], rel=5e-4), (a, b)
        assert b["loss"] == pytest.approx(a["loss"], rel=5e-4), (a, b)
    # the same samples in the same order (the cache changes nothing but the teacher's source)
    for rank in (0, 1):
        keys = [r["keys"] for r in jsonl(online_run / "samples" / f"rank{rank}.jsonl")]
        assert [
            r["keys"] for r in jsonl(cached_run["run_dir"] / "samples" / f"rank{rank}.jsonl")
        ] == keys
    w_online, w_cached = _weights(online_run), _weights(cached_run["run_dir"])
    assert w_online.keys() == w_cached.keys()
    worst = max(float((w_online[k] - w_cached[k]).detach().abs().max()) for k in w_online)
    assert worst < 1e-3, worst


def test_resume_mid_epoch_from_the_cache_is_exact(
    data: dict[str, Path], teacher: Path, cache: Path, cached_run: dict, tmp_path
) -> None:
    """SIGUSR1 to rank 1 after step 3 (mid-epoch 2 is step 5; this is mid-epoch 1), exit 85
    with a checkpoint, resume: the same per-step losses as the uninterrupted cache run."""
    run_dir = tmp_path / "run"
    args = (*_kd(teacher), f"teacher.cache={cache}")
    procs = srun_like(run_dir, data, *args)
    samples = run_dir / "samples" / "rank1.jsonl"
    deadline = time.monotonic() + 300
    while not (samples.is_file() and len(samples.read_text().splitlines()) >= 3):
        assert all(p.poll() is None for p in procs), "a rank exited before the signal"
        assert time.monotonic() < deadline, "the run never reached step 3"
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGUSR1)
    assert wait_all(procs) == [85, 85]
    stopped = max(step_losses(run_dir))
    assert 3 <= stopped < STEPS
    assert wait_all(srun_like(run_dir, data, *args)) == [0, 0]
    want = step_losses(cached_run["run_dir"])
    assert step_losses(run_dir) == want  # bit-exact, the resumed steps included


def test_a_cache_made_for_another_run_is_refused(
    data: dict[str, Path], teacher: Path, cache: Path, tmp_path
) -> None:
    """The trainer refuses before training, naming what differs; each field is checked."""
    args = train_args(
        tmp_path / "run", data, *_kd(teacher), f"teacher.cache={cache}", "data.view_seed=1"
    )
    proc = run_cmd([sys.executable, *args])
    assert proc.returncode != 0
    refusal = "was made for another run: view_seed: cache 0, this run 1"
    assert refusal in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()

    base = [f"data.train={data['train']}", *_kd(teacher), f"teacher.cache={cache}"]
    shards = json.loads((data["train"] / "manifest.json").read_text())["shards"]
    cases = {
        "data.views=2": "views: cache 3, this run 2",
        "data.mixup=0.0": "augment: cache",
        "data.target_length=100": "features: cache",
        f"teacher.checkpoint={cache / 'pass.json'}": "teacher: cache 'sha256:",
    }
    # students of another run.seed share the views, so the cache serves them too
    open_cached_teacher(load_config(CONFIG, [*base, "run.seed=3"]), shards, torch.device("cpu"))
    for override, message in cases.items():
        cfg = load_config(CONFIG, [*base, override])
        with pytest.raises(CacheError, match="made for another run") as err:
            open_cached_teacher(cfg, shards, torch.device("cpu"))
        assert message in str(err.value), str(err.value)
    with pytest.raises(CacheError, match="made for another run: shards"):
        open_cached_teacher(load_config(CONFIG, base), shards[:1], torch.device("cpu"))
    with pytest.raises(CacheError, match="the cache pass did not finish"):
        open_cached_teacher(load_config(CONFIG, [*base, f"teacher.cache={tmp_path}"]), shards,
                            torch.device("cpu"))  # fmt: skip


def test_a_killed_cache_pass_rerun_writes_the_same_files(
    data: dict[str, Path], teacher: Path, cache: Path, tmp_path
) -> None:
    """kill -9 once the first part is on disk, rerun: every part equals the uninterrupted
    2-rank pass's, byte for byte (one process here: the worker count changes nothing)."""
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", *_pass_cmd(data, teacher, out)]
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=ROOT, env=train_env(), stdout=log, stderr=log)
    deadline = time.monotonic() + 300
    while not list(out.glob("part-*.npy")):
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no part written in 300 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    parts = sorted(p.name for p in cache.glob("part-*.npy"))
    assert len(parts) == 2 * VIEWS  # 2 shards x 3 views, one view per file
    written = sorted(p.name for p in out.glob("part-*.npy"))
    assert 1 <= len(written) < len(parts), "the pass finished before it was killed"
    assert not (out / "manifest.json").exists()
    rerun = subprocess.run(cmd, cwd=ROOT, env=train_env(), capture_output=True, text=True,
                           timeout=420)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{len(written)} already complete" in rerun.stderr
    for name in parts:
        assert (out / name).read_bytes() == (cache / name).read_bytes(), name
    assert (out / "manifest.json").read_text() == (cache / "manifest.json").read_text()
    assert np.load(out / parts[0]).dtype == np.float16


@pytest.mark.slurm
def test_the_cache_pass_as_a_slurm_array_with_finalize(
    slurm_cluster: SlurmCluster, data: dict[str, Path], teacher: Path, cache: Path, tmp_path
) -> None:
    """launch/teacher_cache.sbatch as a 2-task array, then teacher_cache_finalize.sbatch:
    the same files as the 2-rank pass; finalize fails while a part is missing."""
    slurm_cluster.env["CMKD_ROOT"] = str(ROOT)
    (tmp_path / "logs").mkdir()
    out = tmp_path / "cache"
    args = _pass_cmd(data, teacher, out)[1:]  # without the module name
    job, code = slurm_cluster.sbatch(
        LAUNCH / "teacher_cache.sbatch", *args, options=["--array=0-1"], cwd=tmp_path, wait=True
    )
    logs = "\n".join(p.read_text() for p in sorted((tmp_path / "logs").glob("*.out")))
    assert code == 0, logs + slurm_cluster.log_tail()
    assert "worker 0/2 owns 3" in logs and "worker 1/2 owns 3" in logs, logs
    finalize = LAUNCH / "teacher_cache_finalize.sbatch"
    _, code = slurm_cluster.sbatch(
        finalize, "--out", out, cwd=tmp_path, wait=True,
        options=[f"--dependency=afterok:{job}", "--kill-on-invalid-dep=yes"],
    )  # fmt: skip
    assert code == 0, slurm_cluster.log_tail()
    for name in [p.name for p in cache.glob("part-*.npy")] + ["manifest.json"]:
        assert (out / name).read_bytes() == (cache / name).read_bytes(), name
    (out / "manifest.json").unlink()
    next(out.glob("part-*.npy")).unlink()
    _, code = slurm_cluster.sbatch(finalize, "--out", out, cwd=tmp_path, wait=True)
    assert code != 0 and not (out / "manifest.json").exists()

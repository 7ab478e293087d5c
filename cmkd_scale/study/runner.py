"""Launching the study's trainings: one ``python -m cmkd_scale.train`` subprocess at a time on
this machine (``torch.distributed.run --nproc_per_node K`` with ``nproc > 1``), or SLURM jobs
through ``launch/train.sbatch``.

SLURM: each phase (the baselines, then the KD rows, which need the baselines' reported models)
is submitted at once (``sbatch --parsable``, one job per training, options from
``launch.sbatch_args``) and the study polls ``squeue`` until the phase's jobs have left the
queue. A preempted job requeues itself and stays in the queue, so waiting on the queue (not on
``sbatch --wait``, which returns at the first attempt's end) waits for the resumed attempt too.
A job is done when its run directory holds its report; anything else is a failure naming the
job's log.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cmkd_scale.dist import free_local_port
from cmkd_scale.study.config import ROOT
from cmkd_scale.study.plan import Training
from cmkd_scale.study.results import is_done, write_note

Echo = Callable[[str], None]


class StudyError(RuntimeError):
    """A training of the study failed; the message names it and its log."""


@dataclass
class Job:
    training: Training
    items: list[str]  # overrides of the recipe
    log: Path


def python_command(args: list[str], nproc: int) -> list[str]:
    """``python ARGS`` (e.g. ``-m cmkd_scale.train ...``), under torchrun with ``nproc > 1``."""
    if nproc <= 1:
        return [sys.executable, *args]
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(free_local_port()), *args,
    ]  # fmt: skip


def train_command(recipe: Path, items: list[str], nproc: int) -> list[str]:
    return python_command(["-m", "cmkd_scale.train", "--config", str(recipe), *items], nproc)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    # the repository first (the study may be started from another directory)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def run_local(jobs: list[Job], recipe: Path, nproc: int, echo: Echo, counter: list[int]) -> None:
    """One training after the other; each one's output goes to its log file."""
    for job in jobs:
        counter[0] += 1
        cmd = train_command(recipe, job.items, nproc)
        t = job.training
        job.log.parent.mkdir(parents=True, exist_ok=True)
        echo(f"[{counter[0]}/{counter[1]}] {t.id}: training (log {job.log})")
        started = time.monotonic()
        with job.log.open("w") as fh:
            fh.write(f"$ {shlex.join(cmd)}\n")
            fh.flush()
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=child_env())
        wall = time.monotonic() - started
        if proc.returncode != 0 or not is_done(t.run_dir):
            raise StudyError(
                f"training {t.id} failed (exit {proc.returncode}) after {wall:.0f} s; its log "
                f"{job.log} ends with:\n{log_tail(job.log)}\nFix the cause and rerun the same "
                "study command: finished trainings are skipped, this one resumes from its "
                "last checkpoint."
            )
        write_note(t.run_dir, {"wall_s": wall, "command": cmd, "log": str(job.log)})
        echo(f"[{counter[0]}/{counter[1]}] {t.id}: done in {wall:.0f} s")


def run_slurm(
    jobs: list[Job],
    recipe: Path,
    sbatch_args: list[str],
    poll_s: float,
    echo: Echo,
    counter: list[int],
    study_name: str,
) -> None:
    """Submit a phase's trainings at once, then wait until they have all left the queue."""
    script = ROOT / "launch" / "train.sbatch"
    env = {**child_env(), "CMKD_ROOT": str(ROOT)}
    submitted: dict[str, tuple[Job, float]] = {}
    for job in jobs:
        counter[0] += 1
        job.log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            "sbatch", "--parsable", f"--job-name=cmkd-{study_name}-{job.training.id}",
            f"--output={job.log.with_suffix('')}-%j.log", *sbatch_args,
            str(script), str(recipe), *job.items,
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise StudyError(
                f"sbatch refused training {job.training.id} (exit {proc.returncode}): "
                f"{proc.stderr.strip()}\ncommand: {shlex.join(cmd)}"
            )
        job_id = proc.stdout.strip().split(";")[0]
        submitted[job_id] = (job, time.monotonic())
        write_note(job.training.run_dir, {"slurm_job": job_id, "command": cmd})
        echo(
            f"[{counter[0]}/{counter[1]}] {job.training.id}: SLURM job {job_id} "
            f"(log {job.log.with_suffix('')}-{job_id}.log)"
        )
    waiting = dict(submitted)
    while waiting:
        time.sleep(poll_s)
        proc = subprocess.run(
            ["squeue", "-h", "-o", "%i", "-j", ",".join(waiting)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
            echo(f"squeue failed ({proc.stderr.strip()}); retrying in {poll_s:.0f} s")
            continue
        queued = {line.strip() for line in proc.stdout.splitlines() if line.strip()}
        for job_id in [j for j in waiting if j not in queued]:
            job, started = waiting.pop(job_id)
            wall = time.monotonic() - started
            t = job.training
            log = job.log.with_suffix("")
            log = log.with_name(f"{log.name}-{job_id}.log")
            if not is_done(t.run_dir):
                raise StudyError(
                    f"training {t.id} (SLURM job {job_id}) left the queue without its report; "
                    f"its log {log} ends with:\n{log_tail(log)}\nFix the cause and rerun the "
                    "study command: finished trainings are skipped."
                )
            write_note(
                t.run_dir,
                {"wall_s": wall, "slurm_job": job_id, "log": str(log), "wall_includes": "queue"},
            )
            echo(f"{t.id}: SLURM job {job_id} done ({wall:.0f} s including queueing)")

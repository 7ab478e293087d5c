"""Failures of a run and its restarts: one JSON line per failure in ``run.dir/failures.jsonl``.

Who writes what:

- a rank that fails in a way it can still report (a lost peer, a collective timeout, a full
  disk, an exception) appends ``{"source": "rank", "rank", "step", "kind", "error", ...}``;
- the launcher appends ``{"source": "launcher", "exit_code", ...}`` once per failed attempt:
  ``launch/train.sbatch`` (which requeues the job while this job id has failed at most
  ``run.max_restarts`` times) and ``python -m cmkd_scale.train.launch`` (torchrun with
  ``--max-restarts``), which print :func:`summary` when the restarts are used up.

A rank killed by a signal writes nothing; its peers' lines and the launcher's exit code say
what happened. This module imports nothing heavy (the batch shell calls it)::

    python -m cmkd_scale.train.restarts record  --run-dir D --job J --attempt N --exit-code RC
    python -m cmkd_scale.train.restarts count   --run-dir D --job J    # failed attempts of job J
    python -m cmkd_scale.train.restarts summary --run-dir D [--job J] [--max-restarts M]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FAILURES = "failures.jsonl"

# Exit codes of the trainer (EXIT_REQUEUE = 85 is cmkd_scale.dist's: preempted, checkpointed)
EXIT_RANK_LOST = 86  # another rank died or hung (a collective failed or timed out): restart
EXIT_NO_SPACE = 87  # a checkpoint/export could not be written (full disk, I/O error): no restart

# what torch.distributed's gloo/nccl errors say when a peer is gone or stuck
_PEER_MARKERS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "Timed out",
    "timed out",
    "Socket Timeout",
    "NCCL communicator was aborted",
    "Watchdog caught collective operation timeout",
    "ProcessGroupGloo",
    "gloo",
)


def attempt_info(env: dict[str, str] | None = None) -> dict[str, Any]:
    """This process's attempt (1-based) and job, from SLURM's or torchrun's variables."""
    env = dict(os.environ) if env is None else env
    if "SLURM_JOB_ID" in env:
        return {
            "launcher": "slurm",
            "job": env["SLURM_JOB_ID"],
            "attempt": int(env.get("SLURM_RESTART_COUNT", "0") or 0) + 1,
        }
    if "TORCHELASTIC_RESTART_COUNT" in env:
        return {
            "launcher": "torchrun",
            "job": env.get("TORCHELASTIC_RUN_ID", ""),
            "attempt": int(env["TORCHELASTIC_RESTART_COUNT"] or 0) + 1,
            "max_restarts": int(env.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0),
        }
    return {"launcher": "single", "job": "", "attempt": 1}


def _short(exc: BaseException) -> str:
    """The first line of an error, without gloo's source location and its boilerplate."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    text = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", text)
    return text.split(". This is typically caused")[0][:300]


def is_peer_failure(exc: BaseException) -> bool:
    """True when ``exc`` says another rank is gone or stuck (not a bug on this rank)."""
    from torch.distributed import DistError  # only the trainer calls this: torch is loaded

    for err in (exc, exc.__cause__, exc.__context__):
        if err is None:
            continue
        if isinstance(err, DistError):
            return True
        if isinstance(err, RuntimeError) and any(m in str(err) for m in _PEER_MARKERS):
            return True
    return False


def record(run_dir: Path, entry: dict[str, Any]) -> None:
    """Append one failure line (small O_APPEND write: lines of several ranks never mix)."""
    line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **entry}) + "\n"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / FAILURES, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    except OSError as exc:  # a full disk must not hide the failure being reported
        print(f"cannot record the failure in {run_dir / FAILURES}: {exc}", file=sys.stderr)


def read(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / FAILURES
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a crash
    return out


def failed_attempts(run_dir: Path, job: str) -> int:
    """Attempts of ``job`` that failed (as the launcher recorded them)."""
    return sum(
        1 for r in read(run_dir) if r.get("source") == "launcher" and str(r.get("job")) == job
    )


def summary(run_dir: Path, *, job: str | None = None, max_restarts: int | None = None) -> str:
    """The failures of a run (of one job id when given), one attempt per paragraph."""
    entries = [r for r in read(run_dir) if job is None or str(r.get("job")) == job]
    if not entries:
        return f"no failures recorded in {run_dir / FAILURES}"
    attempts: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for entry in entries:
        attempts.setdefault((str(entry.get("job", "")), int(entry.get("attempt", 0))), []).append(
            entry
        )
    failed = sum(1 for r in entries if r.get("source") == "launcher")
    head = f"{failed or len(attempts)} failed attempt(s)"
    if max_restarts is not None:
        head += f"; run.max_restarts={max_restarts} is used up, not restarting"
    lines = [f"{head} (details: {run_dir / FAILURES}):"]
    for (job_id, attempt), items in attempts.items():
        when = items[0].get("time", "?")
        lines.append(f"  attempt {attempt}{f' of job {job_id}' if job_id else ''} ({when}):")
        for r in items:
            if r.get("source") == "launcher":
                lines.append(f"    the ranks ended with exit code {r.get('exit_code')}")
            else:
                lines.append(
                    f"    rank {r.get('rank')} at step {r.get('step')}: {r.get('kind')}: "
                    f"{r.get('error')}"
                )
    return "\n".join(lines)


def announce_attempt(max_restarts: int) -> None:
    """Log which attempt this is when it is a restart (and warn on a torchrun mismatch)."""
    info = attempt_info()
    if info["attempt"] > 1:
        log.warning(
            "attempt %d (%s job %s): restarted after a failure or a preemption; see %s",
            info["attempt"],
            info["launcher"],
            info["job"] or "-",
            FAILURES,
        )
    if info["launcher"] == "torchrun" and info.get("max_restarts") != max_restarts:
        log.warning(
            "torchrun --max-restarts %s but run.max_restarts=%d: torchrun's applies; start "
            "with python -m cmkd_scale.train.launch to use the config's",
            info.get("max_restarts"),
            max_restarts,
        )


def exit_code_for(exc: Exception, run_dir: Path, *, step: int) -> int:
    """The trainer's exit code for ``exc``, after one log line and a failures.jsonl record.

    A lost or hung peer -> :data:`EXIT_RANK_LOST` (the launcher restarts the job); a full disk
    or an I/O error -> :data:`EXIT_NO_SPACE` (no restart: it would fail the same way);
    anything else is recorded and re-raised (a traceback is what a bug needs).
    """
    from cmkd_scale.diskspace import StorageError

    info = attempt_info()
    base = {
        "source": "rank",
        "rank": int(os.environ.get("RANK", "0") or 0),
        "step": step,
        "job": info["job"],
        "attempt": info["attempt"],
    }
    first_line = _short(exc)
    if isinstance(exc, StorageError):
        log.error("%s", exc)
        record(run_dir, {**base, "kind": "no_space", "error": str(exc)})
        return EXIT_NO_SPACE
    if is_peer_failure(exc):
        log.error(
            "another rank is gone or hung at step %d (%s: %s): ending this rank; the job "
            "restarts from the newest intact checkpoint (run.max_restarts)",
            step,
            type(exc).__name__,
            first_line,
        )
        record(run_dir, {**base, "kind": "rank_lost", "error": first_line})
        return EXIT_RANK_LOST
    record(run_dir, {**base, "kind": "error", "error": f"{type(exc).__name__}: {first_line}"})
    raise exc


PREEMPTED = "preempted"  # "<job> <attempt>" of the last attempt that checkpointed for a requeue


def mark_preempted(run_dir: Path, *, is_main: bool) -> None:
    """Rank 0, once every rank has saved the preemption checkpoint: say so for the launcher.

    ``srun --kill-on-bad-exit`` ends the others as soon as one rank exits 85, so srun's own
    exit code may be another rank's 143; train.sbatch reads this file instead.
    """
    if not is_main:
        return
    info = attempt_info()
    try:
        (run_dir / PREEMPTED).write_text(f"{info['job']} {info['attempt']}\n")
    except OSError as exc:
        log.warning("cannot write %s: %s", run_dir / PREEMPTED, exc)


def exit_now(code: int) -> None:
    """Flush the logs and leave at once (no interpreter shutdown: threads of DALI and of a
    broken process group can hold it for seconds)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cmkd_scale.train.restarts", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("record", "count", "summary"):
        s = sub.add_parser(name)
        s.add_argument("--run-dir", type=Path, required=True)
        s.add_argument("--job", default=None)
        if name == "record":
            s.add_argument("--attempt", type=int, required=True)
            s.add_argument("--exit-code", type=int, required=True)
            s.add_argument("--launcher", default="slurm")
        if name == "summary":
            s.add_argument("--max-restarts", type=int, default=None)
    args = p.parse_args(argv)
    if args.cmd == "record":
        record(
            args.run_dir,
            {
                "source": "launcher",
                "launcher": args.launcher,
                "job": args.job or "",
                "attempt": args.attempt,
                "exit_code": args.exit_code,
            },
        )
    elif args.cmd == "count":
        print(failed_attempts(args.run_dir, args.job or ""))
    else:
        print(summary(args.run_dir, job=args.job, max_restarts=args.max_restarts))
    return 0


if __name__ == "__main__":
    sys.exit(main())

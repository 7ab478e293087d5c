"""Command line: ``python -m cmkd_scale.prep [finalize|verify] ...``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ..logs import setup_logging
from .decoders import DEFAULT_TIMEOUT_S
from .manifest import FinalizeError, finalize
from .plan import PlanError
from .run import DEFAULT_SHARD_SIZE, WorkerDied, run_prep
from .segments import SegmentsError
from .verify import verify

log = logging.getLogger(__name__)

_EPILOG = """\
other commands:
  python -m cmkd_scale.prep finalize --out DIR   manifest + weights from finished shards
  python -m cmkd_scale.prep verify --out DIR     re-read every shard against the manifest

SLURM job arrays: --num-tasks/--task-id default to SLURM_ARRAY_TASK_COUNT and
SLURM_ARRAY_TASK_ID (relative to SLURM_ARRAY_TASK_MIN); run finalize after all tasks.
"""


def slurm_array_task() -> tuple[int, int] | None:
    """(num_tasks, task_id) of the SLURM array task we run in, or None outside arrays."""
    count = os.environ.get("SLURM_ARRAY_TASK_COUNT")
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    if not count or task is None:
        return None
    first = int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0") or 0)
    step = int(os.environ.get("SLURM_ARRAY_TASK_STEP", "1") or 1)
    return int(count), (int(task) - first) // step


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cmkd_scale.prep",
        description="Raw AudioSet segment CSVs + downloaded audio -> 16 kHz FLAC webdataset "
        "shards with DALI index files, manifest.json and balanced-sampling weights.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--segments",
        type=Path,
        action="append",
        required=True,
        metavar="CSV",
        help="Google segment CSV (repeat for several; concatenated in this order)",
    )
    p.add_argument(
        "--class-labels",
        type=Path,
        required=True,
        metavar="CSV",
        help="class_labels_indices.csv (index,mid,display_name)",
    )
    p.add_argument(
        "--audio-dir",
        type=Path,
        required=True,
        metavar="DIR",
        help="folder searched recursively for {YTID}[_{start}[_{end}]].{ext}",
    )
    p.add_argument(
        "--out",
        default="shards",
        metavar="DIR_OR_URL",
        help="output folder or fsspec URL (default: shards)",
    )
    p.add_argument("--workers", type=int, default=1, help="decoding processes (default 1)")
    p.add_argument(
        "--shard-size",
        type=int,
        default=DEFAULT_SHARD_SIZE,
        help=f"segments per shard, before missing/failed ones (default {DEFAULT_SHARD_SIZE})",
    )
    p.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="count and report malformed CSV rows (and unknown MIDs) instead of stopping",
    )
    p.add_argument(
        "--decode-timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help="a clip not decoded within this time (a hung decoder) is killed, retried alone "
        f"once, then recorded in failed.csv (default {DEFAULT_TIMEOUT_S:g})",
    )
    p.add_argument("--num-tasks", type=int, default=None, help="split shards over K tasks")
    p.add_argument("--task-id", type=int, default=None, help="this task's id in [0, K)")
    p.add_argument(
        "--progress-every",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="seconds between progress lines (default 10)",
    )
    return p


def _task_split(args: argparse.Namespace) -> tuple[int, int]:
    slurm = slurm_array_task()
    num_tasks = args.num_tasks if args.num_tasks is not None else (slurm[0] if slurm else 1)
    if args.task_id is not None:
        return num_tasks, args.task_id
    if num_tasks == 1:
        return 1, 0
    if slurm is None or slurm[0] != num_tasks:
        raise PlanError(f"--num-tasks {num_tasks} needs --task-id (or a SLURM array of that size)")
    return num_tasks, slurm[1]


def _out_parser(command: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m cmkd_scale.prep {command}", description=description
    )
    p.add_argument("--out", default="shards", metavar="DIR_OR_URL", help="the prep output")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    setup_logging()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["finalize"]:
            args = _out_parser(
                "finalize",
                "Write manifest.json, weights.npy, missing.csv and "
                "failed.csv from the per-shard .meta.json files.",
            ).parse_args(argv[1:])
            finalize(args.out)
            return 0
        if argv[:1] == ["verify"]:
            p = _out_parser("verify", "Re-read every shard against manifest.json.")
            p.add_argument("--no-decode", action="store_true", help="skip decoding the FLACs")
            args = p.parse_args(argv[1:])
            problems = verify(args.out, decode=not args.no_decode)
            for problem in problems:
                print(problem)
            if problems:
                log.error("verify: %d problems in %s", len(problems), args.out)
                return 1
            log.info("verify: %s is consistent with its manifest", args.out)
            return 0
        args = _run_parser().parse_args(argv)
        num_tasks, task_id = _task_split(args)
        run_prep(
            args.segments,
            args.class_labels,
            args.audio_dir,
            args.out,
            workers=args.workers,
            shard_size=args.shard_size,
            skip_bad_lines=args.skip_bad_lines,
            num_tasks=num_tasks,
            task_id=task_id,
            progress_every_s=args.progress_every,
            decode_timeout_s=args.decode_timeout,
        )
        return 0
    except (SegmentsError, PlanError, FinalizeError, FileNotFoundError, WorkerDied) as exc:
        log.error("%s", exc)
        return 2

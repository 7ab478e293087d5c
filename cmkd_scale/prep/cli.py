"""Command line: ``python -m cmkd_scale.prep [finalize|verify] ...``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ..diskspace import StorageError
from ..logs import setup_logging
from .config import DEFAULT_ORDER_SEED, DEFAULT_SHARD_SIZE, FORMATS, FSD50K_SPLITS, PrepConfig
from .decoders import DEFAULT_TIMEOUT_S
from .manifest import FinalizeError, finalize
from .plan import PlanError
from .run import WorkerDied, run_prep
from .segments import SegmentsError
from .verify import verify

log = logging.getLogger(__name__)

_EPILOG = """\
other commands:
  python -m cmkd_scale.prep finalize --out DIR   manifest + weights from finished shards
  python -m cmkd_scale.prep verify --out DIR     re-read every shard against the manifest

SLURM job arrays: --num-tasks/--task-id default to SLURM_ARRAY_TASK_COUNT and
SLURM_ARRAY_TASK_ID (relative to SLURM_ARRAY_TASK_MIN); run finalize after all tasks.

--format (what --segments and --class-labels are):
  audioset  Google segment CSVs + class_labels_indices.csv
  esc50     meta/esc50.csv (no --class-labels); --folds 1,2,3,4; --esc10
  fsd50k    FSD50K.ground_truth/dev.csv or eval.csv + vocabulary.csv; --split train|val
  csv       file,labels[,fold] + class names (one per line, or CSV with a name column)
"""


def _folds(text: str) -> tuple[int, ...]:
    try:
        folds = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,2,3,4, got {text!r}") from None
    if not folds:
        raise argparse.ArgumentTypeError("expected at least one fold, like 1,2,3,4")
    return folds


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
        description="Raw AudioSet segment CSVs (or ESC-50, FSD50K, any CSV: --format) + "
        "downloaded audio -> 16 kHz FLAC webdataset shards with DALI index files, "
        "manifest.json and balanced-sampling weights.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--segments",
        type=Path,
        action="append",
        required=True,
        metavar="CSV",
        help="Google segment CSV, or the --format's list (repeat for several; concatenated "
        "in this order)",
    )
    p.add_argument(
        "--class-labels",
        type=Path,
        default=None,
        metavar="CSV",
        help="class_labels_indices.csv (index,mid,display_name); fsd50k: vocabulary.csv; "
        "csv: class names; esc50: not used",
    )
    p.add_argument(
        "--audio-dir",
        type=Path,
        required=True,
        metavar="DIR",
        help="folder searched recursively for {YTID}[_{start}[_{end}]].{ext} (other formats: "
        "the file names their list gives)",
    )
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="audioset",
        help="how --segments/--class-labels are read (default audioset); see below",
    )
    p.add_argument(
        "--folds",
        type=_folds,
        default=None,
        metavar="1,2,3,4",
        help="esc50/csv: keep only rows of these folds",
    )
    p.add_argument(
        "--esc10", action="store_true", help="esc50: only ESC-10 rows and its 10 classes"
    )
    p.add_argument(
        "--split", choices=FSD50K_SPLITS, default=None, help="fsd50k dev.csv: keep this split"
    )
    p.add_argument(
        "--order-seed",
        type=int,
        default=DEFAULT_ORDER_SEED,
        metavar="N",
        help="samples are written in a pseudo-random order from this seed, so every shard "
        f"mixes classes (default {DEFAULT_ORDER_SEED})",
    )
    p.add_argument(
        "--keep-order",
        action="store_true",
        help="write the samples in input order instead (shards may then hold one class each)",
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


def config_from_args(args: argparse.Namespace) -> PrepConfig:
    """The PrepConfig of a parsed command line (SLURM array variables fill the task split)."""
    num_tasks, task_id = _task_split(args)
    return PrepConfig(
        segments=tuple(args.segments),
        class_labels=args.class_labels,
        audio_dir=args.audio_dir,
        out=args.out,
        format=args.format,
        folds=args.folds,
        esc10=args.esc10,
        split=args.split,
        order_seed=args.order_seed,
        keep_order=args.keep_order,
        workers=args.workers,
        shard_size=args.shard_size,
        skip_bad_lines=args.skip_bad_lines,
        decode_timeout_s=args.decode_timeout,
        num_tasks=num_tasks,
        task_id=task_id,
        progress_every_s=args.progress_every,
    )


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
        run_prep(config_from_args(args))
        return 0
    except (
        SegmentsError,
        PlanError,
        FinalizeError,
        FileNotFoundError,
        WorkerDied,
        StorageError,
    ) as exc:
        log.error("%s", exc)
        return 2

"""The main job on an embedded default: the whole system end to end on one machine, as a
one-seed CMKD study on a synthetic dataset.

    python -m cmkd_scale.demo [--out demo_out] [--train-clips 256] [--epochs 5] [--reverse]
                              [--cnn efficientnet_b0] [key.sub=value ...]

No cluster, no GPU, no server needed (a GPU is used when present):
  1. generate a small learnable dataset in AudioSet's exact format (Google CSV, real 527-class
     index, overlapping labels) as train / val / eval splits, and pack each with
     ``cmkd_scale.prep`` into WebDataset shards;
  2. compute the training set's normalisation stats (``python -m cmkd_scale.features stats``);
  3. run ``configs/study_demo.yaml`` through the study command's code
     (:mod:`cmkd_scale.study`): the CNN and AST baselines without KD (the teachers), then the
     AST distilled from the CNN (CMKD; ``--reverse`` adds the CNN distilled from the AST);
  4. print the study table: each model's eval scores, each KD student's gain over its no-KD
     baseline and, when a student ends below its baseline, a line saying so and why; leave
     study.json / study.png in OUT and all runs in one embedded MLflow store (children of
     one parent run), with the command that opens its UI.
Every training is the command a user runs on a cluster (``python -m cmkd_scale.train``),
launched as a subprocess with its output in OUT/logs/.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

from cmkd_scale.logs import setup_logging

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
STUDY = ROOT / "configs" / "study_demo.yaml"
SPLITS = (("train", 0), ("val", 2), ("eval", 1))  # split, generator seed


def _run(cmd: list[str], what: str) -> None:
    """Run one preparation step; its output streams through."""
    log.info("%s: %s", what, shlex.join(cmd))
    started = time.monotonic()
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise SystemExit(
            f"demo: {what} failed (exit {proc.returncode}); command: {shlex.join(cmd)}"
        )
    log.info("%s done in %.0f s", what, time.monotonic() - started)


def _make_data(out: Path, clips: dict[str, int], workers: int) -> dict[str, Path]:
    from cmkd_scale.demo.synth import make_synthetic_audioset

    shards = {}
    for split, seed in SPLITS:
        dest = out / "shards" / split
        if (dest / "manifest.json").is_file():
            log.info("%s shards already in %s", split, dest)
        else:
            ds = make_synthetic_audioset(
                out / "raw", num_clips=clips[split], duration_s=3.0, seed=seed, split=split
            )
            _run(
                [sys.executable, "-m", "cmkd_scale.prep", "--segments", str(ds.segments_csv),
                 "--class-labels", str(ds.class_labels_csv), "--audio-dir", str(ds.audio_dir),
                 "--out", str(dest), "--workers", str(workers), "--shard-size", "64"],
                f"prep {split}",
            )  # fmt: skip
        shards[split] = dest
    return shards


def _norm_stats(train: Path, out: Path) -> tuple[float, float]:
    stats_file = out / "norm_stats.json"
    if not stats_file.is_file():
        _run(
            [sys.executable, "-m", "cmkd_scale.features", "stats", "--shards", str(train),
             "--target-length", "300", "--json", str(stats_file)],
            "normalisation stats",
        )  # fmt: skip
    stats = json.loads(stats_file.read_text())
    return float(stats["norm_mean"]), float(stats["norm_std"])


def _load() -> str:
    """The machine's load while the demo ran: its time means little without it."""
    one, five, fifteen = os.getloadavg()
    cores = os.cpu_count()
    return f"load average {one:.1f} / {five:.1f} / {fifteen:.1f} over 1/5/15 min on {cores} cores"


def _cpu_s() -> float:
    """CPU seconds of the demo and every process it waited for (prep, stats, trainings)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cmkd_scale.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    p.add_argument("--train-clips", type=int, default=256)
    p.add_argument("--val-clips", type=int, default=64)
    p.add_argument("--eval-clips", type=int, default=96)
    p.add_argument("--epochs", type=int, default=0, help="epochs per training (0: the study's)")
    p.add_argument("--cnn", default="", help="e.g. efficientnet_b0 (default: MobileNetV3-Small)")
    p.add_argument("--reverse", action="store_true", help="also distill the CNN from the AST")
    p.add_argument("--workers", type=int, default=1, help="prep processes (1 = in-process)")
    p.add_argument("overrides", nargs="*", help="extra key.sub=value for every training")
    args = p.parse_args(argv)
    setup_logging()
    started = time.monotonic()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    clips = {"train": args.train_clips, "val": args.val_clips, "eval": args.eval_clips}
    shards = _make_data(out, clips, args.workers)
    mean, std = _norm_stats(shards["train"], out)

    from cmkd_scale.study.cli import run_study
    from cmkd_scale.study.config import load_study
    from cmkd_scale.study.plan import has_val_split

    rows = ["cnn", "ast", "cnn2ast"] + (["ast2cnn"] if args.reverse else [])
    items = [
        f"out={out}",  # runs/, logs/, study.json, study.png, mlflow.db (the embedded store)
        f"rows={','.join(rows)}",
        f"data.train={shards['train']}",
        # model selection on the val split where the trainer takes one (never on eval)
        f"data.val={shards['val'] if has_val_split() else ''}",
        f"data.eval={shards['eval']}",
        f"train.data.norm_mean={mean}",
        f"train.data.norm_std={std}",
    ]
    if args.epochs:  # every training, the CNN teacher included
        items += [f"train.run.epochs={args.epochs}", f"cnn.run.epochs={args.epochs}"]
    if args.cnn:
        items += [
            "cnn.model.arch=efficientnet",
            f"cnn.model.name={args.cnn}",
            "cnn.model.pooling=attention",
        ]
    items += [f"train.{item}" for item in args.overrides]
    from cmkd_scale.config import ConfigError
    from cmkd_scale.study.runner import StudyError

    try:
        run_study(load_study(STUDY, items))
    except ConfigError as exc:
        print(f"demo: config error: {exc}", file=sys.stderr)
        return 2
    except StudyError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    tracking_uri = f"sqlite:///{out / 'mlflow.db'}"
    print(
        "\n".join(
            [
                "",
                f"demo finished in {time.monotonic() - started:.0f} s ({_cpu_s():.0f} CPU-s; "
                f"{_load()}); outputs in {out}",
                "open the MLflow UI on these runs with:",
                f"  .venv/bin/mlflow ui --backend-store-uri {tracking_uri} --port 5000",
                "then a 'MLflow runs table:' link logged above (eval and KD columns),",
                "or the UI sidebar's 'Model training' switch (it opens on GenAI pages)",
            ]
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

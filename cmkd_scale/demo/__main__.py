"""The main job on an embedded default: the whole system end to end on one machine.

    python -m cmkd_scale.demo [--out demo_out] [--train-clips 320] [--epochs 6]

No cluster, no GPU, no server needed (a GPU is used when present):
  1. generate a small learnable dataset in AudioSet's exact format (Google CSV, real 527-class
     index, overlapping labels) and pack it with ``cmkd_scale.prep`` into WebDataset shards;
  2. compute the dataset's normalisation stats (``cmkd_scale.features stats``);
  3. train the two families plainly (a small CNN, a small AST) — these are the teachers and
     the no-KD baselines;
  4. distill the AST from the CNN (CMKD; ``--reverse`` also distills the CNN from the AST);
  5. take every run's best per-epoch evaluation (mAP/mAUC/d'), print the table, and
     leave all runs in one embedded MLflow store with the command that opens its UI.
Every stage is the same command a user runs on a cluster, launched as a subprocess.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cmkd_scale.logs import setup_logging

log = logging.getLogger(__name__)

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"

# The demo's CNN is timm's MobileNetV3-Small: on 2 CPU cores EfficientNet-B0 trains ~6x slower
# (depthwise convolutions), which would not fit the 10-minute budget. The recipes use
# EfficientNet-B2 with PSLA attention pooling; `--cnn efficientnet_b0` runs the demo with it.
CNN = ["model.arch=timm", "model.name=mobilenetv3_small_100"]


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    student: list[str]
    teacher_of: str = ""  # name of the stage whose best model teaches this one
    teacher_arch: str = ""  # the rest of the teacher's architecture comes from its export


def stages(cnn: list[str], reverse: bool) -> list[Stage]:
    """Teacher/baseline runs first, then the distillation runs that use them."""
    arch = cnn[0].split("=")[1]
    out = [
        Stage("cnn", "CNN (no KD)", cnn),
        Stage("ast", "AST (no KD)", []),
        Stage("cnn2ast", "AST <- CNN teacher (CMKD)", [], "cnn", arch),
    ]
    if reverse:
        out.append(Stage("ast2cnn", "CNN <- AST teacher (CMKD)", cnn, "ast", "ast"))
    return out


def _run(cmd: list[str], what: str) -> None:
    """Run one stage's command; its output streams through."""
    log.info("%s: %s", what, shlex.join(cmd))
    started = time.monotonic()
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise SystemExit(
            f"demo: {what} failed (exit {proc.returncode}); command: {shlex.join(cmd)}"
        )
    log.info("%s done in %.0f s", what, time.monotonic() - started)


def _make_data(out: Path, train_clips: int, eval_clips: int, workers: int) -> tuple[Path, Path]:
    from cmkd_scale.demo.synth import make_synthetic_audioset

    shards = {}
    for split, clips, seed in (("train", train_clips, 0), ("eval", eval_clips, 1)):
        dest = out / "shards" / split
        if (dest / "manifest.json").is_file():
            log.info("%s shards already in %s", split, dest)
        else:
            ds = make_synthetic_audioset(
                out / "raw", num_clips=clips, duration_s=3.0, seed=seed, split=split
            )
            _run(
                [sys.executable, "-m", "cmkd_scale.prep", "--segments", str(ds.segments_csv),
                 "--class-labels", str(ds.class_labels_csv), "--audio-dir", str(ds.audio_dir),
                 "--out", str(dest), "--workers", str(workers), "--shard-size", "64"],
                f"prep {split}",
            )  # fmt: skip
        shards[split] = dest
    return shards["train"], shards["eval"]


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cmkd_scale.demo", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    p.add_argument("--train-clips", type=int, default=256)
    p.add_argument("--eval-clips", type=int, default=96)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--cnn", default="", help="e.g. efficientnet_b0 (default: MobileNetV3-Small)")
    p.add_argument("--reverse", action="store_true", help="also distill the CNN from the AST")
    p.add_argument("--workers", type=int, default=1, help="prep processes (1 = in-process)")
    p.add_argument("overrides", nargs="*", help="extra key.sub=value for every training stage")
    args = p.parse_args(argv)
    setup_logging()
    started = time.monotonic()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    train, evalset = _make_data(out, args.train_clips, args.eval_clips, args.workers)
    mean, std = _norm_stats(train, out)
    tracking_uri = f"sqlite:///{out / 'mlflow.db'}"
    common = [
        f"data.train={train}", f"data.eval={evalset}", f"data.norm_mean={mean}",
        f"data.norm_std={std}", f"run.epochs={args.epochs}", f"tracking.uri={tracking_uri}",
    ]  # fmt: skip

    cnn = CNN
    if args.cnn:
        cnn = ["model.arch=efficientnet", f"model.name={args.cnn}", "model.pooling=attention"]
    plan = stages(cnn, args.reverse)
    results: dict[str, dict] = {}
    for stage in plan:
        run_dir = out / "runs" / stage.name
        cmd = [sys.executable, "-m", "cmkd_scale.train", "--config", str(CONFIG), *common,
               f"run.dir={run_dir}", f"run.name=demo-{stage.name}", *stage.student]  # fmt: skip
        if stage.teacher_of:
            teacher = out / "runs" / stage.teacher_of / "models" / "best.pt"
            cmd += [f"teacher.arch={stage.teacher_arch}", f"teacher.checkpoint={teacher}"]
        cmd += args.overrides
        _run(cmd, f"train {stage.name}")
        results[stage.name] = _best_eval(run_dir)

    chance = _chance_map(evalset)
    lines = [
        "",
        f"{'model':42s} {'mAP':>7s} {'mAUC':>7s} {'d-prime':>8s}",
        f"{'chance (label prevalence)':42s} {chance:7.3f}",
    ]
    for stage in plan:
        r = results[stage.name]
        lines.append(f"{stage.title:42s} {r['mAP']:7.3f} {r['mAUC']:7.3f} {r['dprime']:8.3f}")
    lines += [
        "",
        f"demo finished in {time.monotonic() - started:.0f} s; outputs in {out}",
        "open the MLflow UI on these runs with:",
        f"  .venv/bin/mlflow ui --backend-store-uri {tracking_uri} --port 5000",
    ]
    print("\n".join(lines))
    (out / "results.json").write_text(json.dumps({"chance_mAP": chance, **results}, indent=2))
    return 0


def _best_eval(run_dir: Path) -> dict:
    """The best of the trainer's per-epoch evaluations (the one kept as models/best.pt)."""
    summaries = sorted((run_dir / "eval").glob("epoch-*_summary.json"))
    if not summaries:
        raise SystemExit(f"demo: no evaluation results in {run_dir / 'eval'}")
    return max((json.loads(p.read_text()) for p in summaries), key=lambda r: r["mAP"])


def _chance_map(evalset: Path) -> float:
    """mAP of a random scorer = mean positive rate over the classes present in the eval set."""
    manifest = json.loads((evalset / "manifest.json").read_text())
    counts = [c for c in manifest["class_counts"] if c > 0]
    return sum(counts) / len(counts) / manifest["num_samples"]


if __name__ == "__main__":
    sys.exit(main())

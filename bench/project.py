"""Project full-AudioSet epoch time on 1/8/64 GPUs, and the CPU cores per GPU decoding needs.

From measured figures only:
  * per-device training clips/s: bench/results/train_gpu.json (else train_cpu.json, which is a
    reduced-size CPU figure and is labelled so), one case and ZeRO stage;
  * CPU milliseconds per training clip of the loader: bench/results/loader.json (written by
    bench/bench_loader.py; its GPU-pipeline figure when present, else the CPU pipeline's), or,
    when that file is absent, measured here through cmkd_scale.data's TrainLoader on 10 s clips.

    epoch_s(n)       = clips / (per_device_clips_per_s x n x efficiency(n))
    cores_per_gpu    = per_device_clips_per_s x cpu_ms_per_clip / 1000

    .venv/bin/python bench/project.py [--clips 2041789 --missing 0.10] [--gpus 1,8,64]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common

log = logging.getLogger("bench.project")

AUDIOSET_TRAIN_CLIPS = 2_041_789  # segments in unbalanced_train_segments.csv
# Scaling efficiency assumed (not measured here): within one 8-GPU NVLink node ZeRO-2's
# gradient reduce-scatter overlaps backward well; across nodes (64 = 8 nodes) it crosses the
# network, and AST-B's 87 M parameters make every step a ~350 MB bf16 reduction.
DEFAULT_EFFICIENCY = {1: 1.0, 8: 0.95, 64: 0.85}


def parse_efficiency(text: str) -> dict[int, float]:
    """``8=0.95,64=0.85`` -> {8: 0.95, 64: 0.85} (1 GPU is always 1.0)."""
    out = {1: 1.0}
    for item in filter(None, text.split(",")):
        n, _, eff = item.partition("=")
        value = float(eff)
        if not 0 < value <= 1:
            raise ValueError(f"--efficiency {item!r}: efficiency must be in (0, 1]")
        out[int(n)] = value
    return out


def efficiency_for(n: int, table: dict[int, float]) -> float:
    """The assumed efficiency at ``n`` GPUs: the entry for the largest count <= n."""
    return table[max(k for k in table if k <= n)]


def training_rate(train: dict[str, Any], case: str, stage: str) -> tuple[float, dict[str, Any]]:
    """Per-device clips/s of ``case`` at ``stage`` and where it was measured."""
    try:
        figures = train["cases"][case]["stages"][stage]
    except KeyError as exc:
        have = {c: sorted(v["stages"]) for c, v in train.get("cases", {}).items()}
        raise SystemExit(f"no {case}/{stage} in the training results (have {have})") from exc
    source = {
        "case": case,
        "stage": stage,
        "size": train["settings"]["size"],
        "precision": train["settings"]["precision"],
        "device": train["machine"]["gpu"] or f"CPU ({train['machine']['cpu_count']} cores)",
        "micro_batch": figures["micro_batch"],
        "data_wait_frac": figures["data_wait_frac"],
        "mfu": figures["mfu"],
    }
    return float(figures["clips_per_s_per_device"]), source


def loader_cost(loader: dict[str, Any]) -> tuple[float, str]:
    """CPU ms per training clip from bench_loader's JSON (GPU pipeline when measured)."""
    if "ours_gpu" in loader:
        return float(loader["ours_gpu"]["train"]["cpu_ms_per_clip"]), (
            "bench/results/loader.json: GPU pipeline (decode on CPU, features on GPU), training "
            "mode, 10 s clips"
        )
    return float(loader["ours_cpu"]["train"]["cpu_ms_per_clip"]), (
        "bench/results/loader.json: CPU pipeline (decode + fbank + augmentation on CPU), "
        "training mode, 10 s clips: an upper bound for a GPU run (features move to the GPU)"
    )


def measure_loader_cost(clips: int = 24) -> tuple[float, str]:
    """CPU ms per clip of one TrainLoader epoch on 10 s clips (used when loader.json is absent)."""
    import torch

    from cmkd_scale.config import DataConfig
    from cmkd_scale.data import TrainLoader

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        shards = _common.make_shards(Path(tmp), clips=clips, duration_s=10.0, shard_size=16)
        cfg = DataConfig(train=str(shards), num_threads=1, mixup=0.5)
        loader = TrainLoader(cfg, micro_batch=4, rank=0, world_size=1, seed=0, device="cpu")
        for _ in loader.epoch_batches(0):  # warm-up: page cache, DALI start-up
            pass
        cpu0, done = time.process_time(), 0
        for batch in loader.epoch_batches(1):
            done += len(batch.keys)
        cpu_ms = 1000 * (time.process_time() - cpu0) / done
    return cpu_ms, (
        f"measured here: TrainLoader (CPU pipeline, mixup + SpecAugment) over {done} 10 s "
        "clips, process CPU time: an upper bound for a GPU run"
    )


def project(
    per_device: float,
    cpu_ms_per_clip: float,
    *,
    clips: int,
    missing: float,
    gpus: list[int],
    efficiency: dict[int, float],
) -> dict[str, Any]:
    """Epoch time and decode cores for each GPU count."""
    present = round(clips * (1 - missing))
    cores_per_gpu = per_device * cpu_ms_per_clip / 1000
    rows = []
    for n in gpus:
        eff = efficiency_for(n, efficiency)
        rate = per_device * n * eff
        rows.append(
            {
                "gpus": n,
                "efficiency": eff,
                "clips_per_s": round(rate, 2),
                "epoch_s": round(present / rate, 1),
                "epoch_h": round(present / rate / 3600, 3),
                "decode_cores": round(cores_per_gpu * n * eff, 2),
            }
        )
    return {
        "clips_listed": clips,
        "missing_frac": missing,
        "clips_present": present,
        "per_device_clips_per_s": per_device,
        "cpu_ms_per_clip": cpu_ms_per_clip,
        "decode_cores_per_gpu": round(cores_per_gpu, 3),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=Path, default=None, help="bench_train JSON")
    p.add_argument("--loader", type=Path, default=_common.RESULTS / "loader.json")
    p.add_argument("--case", default="kd_ast")
    p.add_argument("--stage", default="zero2")
    p.add_argument("--clips", type=int, default=AUDIOSET_TRAIN_CLIPS, help="train clips listed")
    p.add_argument("--missing", type=float, default=0.10, help="fraction no longer downloadable")
    p.add_argument("--gpus", default="1,8,64", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--efficiency", default="", help="e.g. 8=0.95,64=0.85 (default: that)")
    p.add_argument("--measure-clips", type=int, default=24, help="when loader.json is absent")
    p.add_argument("--out", type=Path, default=_common.RESULTS / "projection.json")
    args = p.parse_args(argv)
    if not 0 <= args.missing < 1:
        p.error("--missing is a fraction in [0, 1)")
    efficiency = {**DEFAULT_EFFICIENCY, **parse_efficiency(args.efficiency)}

    train_path = args.train
    if train_path is None:
        gpu = _common.RESULTS / "train_gpu.json"
        train_path = gpu if gpu.is_file() else _common.RESULTS / "train_cpu.json"
    if not train_path.is_file():
        p.error(f"{train_path} does not exist: run bench/bench_train.py first (or pass --train)")
    per_device, source = training_rate(json.loads(train_path.read_text()), args.case, args.stage)
    if args.loader.is_file():
        cpu_ms, cost_source = loader_cost(json.loads(args.loader.read_text()))
    else:
        log.info("%s absent: measuring the loader's CPU cost here", args.loader)
        cpu_ms, cost_source = measure_loader_cost(args.measure_clips)

    result = project(
        per_device,
        cpu_ms,
        clips=args.clips,
        missing=args.missing,
        gpus=args.gpus,
        efficiency=efficiency,
    )
    on_gpu = not source["device"].startswith("CPU")
    result.update(
        {
            "benchmark": "projection",
            "machine": _common.machine_info(),
            "training_source": {"file": str(train_path), **source},
            "loader_source": cost_source,
            "assumptions": [
                f"{args.clips} listed train clips, {100 * args.missing:.0f} % missing "
                f"-> {result['clips_present']} clips per epoch (no balanced resampling)",
                f"per-device rate {per_device:.2f} clips/s measured by bench_train "
                f"({source['case']}, {source['stage']}, {source['size']} size, "
                f"{source['precision']}, on {source['device']})"
                + ("" if on_gpu else ": a reduced-size CPU figure, NOT a GPU rate; the rows "
                   "show the arithmetic, rerun bench_train on a GPU for real numbers"),
                "scaling efficiency assumed, not measured: "
                + ", ".join(f"{n} GPU(s) {e:.2f}" for n, e in sorted(efficiency.items())),
                "data loading keeps up (decode cores are provided as computed); eval and "
                "checkpoint time are not included",
                f"decode CPU cost {cpu_ms:.2f} ms per clip from {cost_source}",
            ],
        }
    )  # fmt: skip
    _common.write_json(args.out, result)
    print("\n".join(result["assumptions"]))
    print(f"{'GPUs':>5} {'eff':>5} {'clips/s':>10} {'epoch h':>9} {'decode cores':>13}")
    for row in result["rows"]:
        print(
            f"{row['gpus']:5d} {row['efficiency']:5.2f} {row['clips_per_s']:10.1f} "
            f"{row['epoch_h']:9.2f} {row['decode_cores']:13.1f}"
        )
    print(f"decode cores per GPU: {result['decode_cores_per_gpu']:.2f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

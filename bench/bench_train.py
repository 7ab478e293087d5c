"""Training-step throughput, step-time split, MFU, teacher overhead and memory, by ZeRO stage.

Two CMKD settings, each through the real system (DALI TrainLoader on shards made by the real
prep from generated audio -> FrozenTeacher -> DeepSpeed student -> DistillLoss):
  kd_ast  AST student (16x16 patches, stride 10) taught by an EfficientNet teacher;
  kd_cnn  EfficientNet student (PSLA attention pooling) taught by an AST teacher.
Sizes: ``full`` = AST-B/16 at 1024x128 and EfficientNet-B2 in bf16 (a GPU); ``cpu`` = a small
AST (width 192, depth 4) and EfficientNet-B0 on 2 s inputs in fp32; ``dry`` = tiniest, for
tests. Per ZeRO stage one launch of bench/_train_worker.py (``torch.distributed.run``, 2 ranks
over gloo on CPU, one per GPU); its stage-2 launch also times the reference way, plain PyTorch
(DDP + torch Adam + autocast, as AST trains) on the same batches, for the ratio.

MFU = FLOPs counted by torch.utils.flop_counter.FlopCounterMode over one micro-step (teacher
forward + student forward/backward) / measured step time / peak FLOP/s per device (datasheet
dense bf16 for H100/H200; on CPU a measured fp32 matmul peak, said so in the JSON).
Memory: peak GPU memory (allocated) per stage, or peak RSS per rank on CPU; ``--search`` finds
the largest micro batch that fits by doubling then bisecting on out-of-memory, one fresh
process per try (GPU memory, or on CPU an address-space cap ``--mem-cap-gib``).

    .venv/bin/python bench/bench_train.py                       # CPU: --size cpu, 2 ranks
    .venv/bin/python bench/bench_train.py --size full --search  # on a GPU
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any

import _common
import torch

from cmkd_scale.config import load_config
from cmkd_scale.logs import setup_logging

log = logging.getLogger("bench.train")

WORKER = Path(__file__).resolve().with_name("_train_worker.py")


@dataclass(frozen=True)
class Size:
    """Model and input sizes for one benchmark scale."""

    clip_s: float
    target_length: int
    clips: int
    micro_batch: dict[str, int]
    ast: tuple[str, ...]  # the AST's model.* overrides (student or teacher)
    cnn: str  # timm EfficientNet name
    precision: str
    steps: int
    warmup: int


AST_BASE = ("name=deit_base_distilled_patch16_384", "fstride=10", "tstride=10")
SIZES = {
    "full": Size(
        clip_s=10.0,
        target_length=1024,
        clips=2048,  # 42 steps of 48 per epoch: few DALI rebuilds inside a phase
        micro_batch={"kd_ast": 48, "kd_cnn": 64},
        ast=AST_BASE,
        cnn="efficientnet_b2",
        precision="bf16",
        steps=60,
        warmup=10,
    ),
    "cpu": Size(
        clip_s=2.0,
        target_length=200,
        clips=192,
        micro_batch={"kd_ast": 4, "kd_cnn": 4},
        ast=(*AST_BASE, "embed_dim=192", "depth=4", "num_heads=3"),
        cnn="efficientnet_b0",
        precision="fp32",
        steps=6,
        warmup=2,
    ),
    "dry": Size(
        clip_s=1.5,
        target_length=128,
        clips=32,
        micro_batch={"kd_ast": 2, "kd_cnn": 2},
        ast=(*AST_BASE, "embed_dim=64", "depth=2", "num_heads=2"),
        cnn="efficientnet_b0",
        precision="fp32",
        steps=2,
        warmup=1,
    ),
}
CASES = {
    "kd_ast": "AST student <- EfficientNet teacher",
    "kd_cnn": "EfficientNet student <- AST teacher",
}


def case_overrides(case: str, size: Size, shards: Path, run_dir: Path, stage: int) -> list[str]:
    """The config of one case at one ZeRO stage, as key.sub=value overrides."""
    common = [
        f"run.dir={run_dir}",
        "run.max_steps=1000000",
        "run.log_every_steps=1000000",
        f"data.train={shards}",
        f"data.eval={shards}",
        f"data.target_length={size.target_length}",
        "data.mixup=0.5",  # AST's AudioSet recipe: mixup + SpecAugment in the loader
        f"data.freqm={min(48, size.target_length // 8)}",
        f"data.timem={min(192, size.target_length // 5)}",
        "data.shuffle_shards=16",  # the default: 16 shards shuffled together
        f"data.num_threads={4 if torch.cuda.is_available() else 1}",
        "data.device=auto",
        "optim.warmup_steps=0",
        f"deepspeed.zero_stage={stage}",
        f"deepspeed.precision={size.precision}",
        f"deepspeed.micro_batch={size.micro_batch[case]}",
        "tracking.enabled=false",
    ]
    cnn = ["arch=efficientnet", f"name={size.cnn}"]
    if case == "kd_ast":
        student = ["arch=ast", *size.ast]
        teacher = ["arch=efficientnet", f"name=random:{size.cnn}"]
    else:
        student = cnn
        teacher = ["arch=ast", *(f"name=random:{v[5:]}" if v.startswith("name=") else v
                                 for v in size.ast)]  # fmt: skip
    teacher.append("dtype=auto")  # bf16 on a GPU, fp32 on CPU
    return common + [f"model.{o}" for o in student] + [f"teacher.{o}" for o in teacher]


def write_case_config(workdir: Path, case: str, stage: int, overrides: list[str]) -> Path:
    """Resolve the overrides through the real config loader; save the YAML the worker reads."""
    path = workdir / f"{case}_zero{stage}.yaml"
    path.write_text(load_config(None, overrides).to_yaml())
    return path


def launch(config: Path, out: Path, nproc: int, extra: list[str], timeout: float) -> dict:
    """Run the worker on ``nproc`` ranks; its JSON (raises with the log tail on failure)."""
    # one rank needs no launcher (saves torchrun's start-up); the worker then runs "single"
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        if nproc > 1
        else [sys.executable]
    )
    cmd = [*launcher, str(WORKER), "--config", str(config), "--out", str(out), *extra]
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    log.info("launch: %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0 or not out.is_file():
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise RuntimeError(f"benchmark worker failed (exit {proc.returncode}):\n{tail}")
    return json.loads(out.read_text())


def summarize(ranks: list[dict[str, Any]], micro_batch: int) -> dict[str, Any]:
    """One stage's figures from every rank's record (ranks step in lockstep)."""
    r0 = ranks[0]
    kd, student = r0["kd"], r0["student_only"]
    step_s = mean(r["kd"]["step_ms"] for r in ranks) / 1000
    student_s = mean(r["student_only"]["step_ms"] for r in ranks) / 1000
    flops = r0["flops"]
    peak = mean(r["peak_flops"] for r in ranks)
    split = {k: round(mean(r["split"][k] for r in ranks), 2) for k in r0["split"]}
    out: dict[str, Any] = {
        "micro_batch": micro_batch,
        "ranks": len(ranks),
        "clips_per_s": round(kd["clips_per_s"], 3),
        "clips_per_s_per_device": round(kd["clips_per_s"] / len(ranks), 3),
        "step_ms": round(1000 * step_s, 2),
        "data_wait_frac": round(max(r["kd"]["data_wait_frac"] for r in ranks), 4),
        "data_wait_frac_steady": round(max(r["kd"]["data_wait_frac_steady"] for r in ranks), 4),
        "epoch_starts": kd["epoch_starts"],
        "student_only_clips_per_s": round(student["clips_per_s"], 3),
        "teacher_overhead": {
            "clips_per_s_ratio_with_to_without": round(
                kd["clips_per_s"] / student["clips_per_s"], 3
            ),
            "step_ms_added": round(1000 * (step_s - student_s), 2),
        },
        "split_ms": split,
        "flops_per_micro_step": flops,
        "peak_flops_per_device": peak,
        "peak_source": r0["peak_source"],
        "mfu": round(flops["step"] / step_s / peak, 4),
        "mfu_student_only": round(flops["student"] / student_s / peak, 4),
        "memory": {
            "kind": r0["memory"]["kind"],
            "peak_gib_per_rank": [round(r["memory"]["peak_gib"], 3) for r in ranks],
        },
    }
    if "reference" in r0:
        ref = r0["reference"]
        out["reference"] = {
            "what": "plain PyTorch: DDP + torch.optim.Adam + autocast, same batches and teacher",
            "clips_per_s": round(ref["clips_per_s"], 3),
            "step_ms": round(ref["step_ms"], 2),
            "ratio_ours_to_reference": round(kd["clips_per_s"] / ref["clips_per_s"], 3),
        }
    return out


def largest_fitting(
    fits: Callable[[int], bool], start: int, max_probes: int
) -> tuple[int, int | None]:
    """(largest micro batch known to fit, smallest known not to): double, then bisect.

    Stops when the two are within 12.5 % of each other (or adjacent) or after ``max_probes``
    tries; 0 fits means not even a batch of 1 was shown to fit.
    """
    lo, hi = 0, None
    batch, probes = max(1, start), 0
    while probes < max_probes:
        if hi is not None and hi - lo <= max(1, lo // 8):
            break
        candidate = batch if hi is None else (lo + hi) // 2
        probes += 1
        if fits(candidate):
            lo = candidate
            batch = candidate * 2
        else:
            hi = candidate
    return lo, hi


def search_micro_batch(
    config: Path, workdir: Path, start: int, *, mem_cap_gib: float, max_probes: int, timeout: float
) -> dict[str, Any]:
    """Largest micro batch whose two micro-steps fit, one fresh single-rank process per try."""
    probes: list[dict[str, Any]] = []

    def fits(batch: int) -> bool:
        out = workdir / f"probe_{config.stem}_{batch}.json"
        extra = ["--probe", str(batch), "--mem-cap-gib", str(mem_cap_gib)]
        result = launch(config, out, 1, extra, timeout)["ranks"][0]
        probes.append(result)
        log.info("probe micro batch %d: %s", batch, "fits" if result["fits"] else "OOM")
        return bool(result["fits"])

    lo, hi = largest_fitting(fits, start, max_probes)
    return {
        "largest_fitting": lo,
        "first_failing": hi,
        "probes": probes,
        "limit": (
            "GPU memory"
            if torch.cuda.is_available()
            else f"CPU stand-in: address-space cap of {mem_cap_gib} GiB above the process's size"
        ),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every case x stage; the results document."""
    size = SIZES[args.size]
    steps = args.steps or size.steps
    warmup = args.warmup if args.warmup is not None else size.warmup
    nproc = args.nproc or (torch.cuda.device_count() if torch.cuda.is_available() else 2)
    result: dict[str, Any] = {
        "benchmark": "train_step",
        "machine": _common.machine_info(),
        "settings": {
            "size": args.size,
            "clip_s": size.clip_s,
            "target_length": size.target_length,
            "precision": size.precision,
            "ranks": nproc,
            "steps_per_phase": steps,
            "warmup_steps": warmup,
            "stages": args.stages,
            "cases": {c: CASES[c] for c in args.cases},
        },
        "notes": [
            "clips/s counts clips over all ranks; per_device divides by the rank count",
            "step split from a separate instrumented pass (synchronised timers), so its step_ms "
            "can exceed the clean pass's",
            "MFU counts teacher forward + student forward/backward FLOPs (optimizer excluded)",
        ],
        "cases": {},
    }
    if not torch.cuda.is_available():
        result["notes"].append(
            "CPU: peak FLOP/s is a measured fp32 matmul per rank (no datasheet), memory is peak "
            f"RSS per rank; {nproc} ranks share {os.cpu_count()} cores with other work "
            f"(load {result['machine']['loadavg_1m']})"
        )
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        shards = _common.make_shards(
            workdir / "data", clips=size.clips, duration_s=size.clip_s, shard_size=64
        )
        log.info("shards ready in %.1f s", time.perf_counter() - t0)
        for case in args.cases:
            stages: dict[str, Any] = {}
            for stage in args.stages:
                overrides = case_overrides(case, size, shards, workdir / "run" / case, stage)
                config = write_case_config(workdir, case, stage, overrides)
                extra = ["--steps", str(steps), "--warmup", str(warmup)]
                if stage == args.reference_stage:
                    extra.append("--reference")
                out = workdir / f"{case}_zero{stage}.json"
                ranks = launch(config, out, nproc, extra, args.timeout)["ranks"]
                stages[f"zero{stage}"] = summarize(ranks, size.micro_batch[case])
                report_stage(case, stage, stages[f"zero{stage}"])
                if args.search:
                    stages[f"zero{stage}"]["micro_batch_search"] = search_micro_batch(
                        config,
                        workdir,
                        size.micro_batch[case],
                        mem_cap_gib=args.mem_cap_gib,
                        max_probes=args.max_probes,
                        timeout=args.timeout,
                    )
                    found = stages[f"zero{stage}"]["micro_batch_search"]
                    print(
                        f"  largest micro batch that fits: {found['largest_fitting']} "
                        f"(first failing {found['first_failing']}, {len(found['probes'])} tries)"
                    )
            result["cases"][case] = {"description": CASES[case], "stages": stages}
    return result


def report_stage(case: str, stage: int, s: dict[str, Any]) -> None:
    """Print one stage's figures."""
    split = s["split_ms"]
    parts = " ".join(f"{k.removesuffix('_ms')} {split[k]:.1f}" for k in split if k != "step_ms")
    ref = s.get("reference")
    ref_text = (
        f"; reference {ref['clips_per_s']:.2f} clips/s, ours/reference "
        f"{ref['ratio_ours_to_reference']:.2f}"
        if ref
        else ""
    )
    mem = s["memory"]
    overhead = s["teacher_overhead"]["clips_per_s_ratio_with_to_without"]
    print(
        f"{case} ZeRO-{stage}: {s['clips_per_s']:.2f} clips/s ({s['ranks']} ranks x micro "
        f"{s['micro_batch']}), step {s['step_ms']:.1f} ms, data wait "
        f"{100 * s['data_wait_frac']:.1f} % ({100 * s['data_wait_frac_steady']:.1f} % "
        f"outside {s['epoch_starts']} epoch starts), MFU {100 * s['mfu']:.1f} % "
        f"(student only {100 * s['mfu_student_only']:.1f} %){ref_text}\n"
        f"  split ms: {parts}\n"
        f"  teacher overhead: {s['student_only_clips_per_s']:.2f} clips/s without -> "
        f"{s['clips_per_s']:.2f} with (x{overhead:.2f})\n"
        f"  memory ({mem['kind']}): {mem['peak_gib_per_rank']} GiB per rank"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="full" if gpu else "cpu")
    p.add_argument("--cases", default="kd_ast,kd_cnn", type=lambda s: s.split(","))
    p.add_argument("--stages", default="1,2,3", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--reference-stage", type=int, default=2, help="stage that also times AST's way")
    p.add_argument("--steps", type=int, default=0, help="timed micro-steps per phase")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--nproc", type=int, default=0, help="ranks (default: GPUs, or 2 on CPU)")
    p.add_argument("--search", action="store_true", help="find the largest micro batch")
    p.add_argument("--mem-cap-gib", type=float, default=1.0, help="CPU search memory cap")
    p.add_argument("--max-probes", type=int, default=8)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per launch")
    p.add_argument("--workdir", type=Path, default=None, help="keep shards/configs here")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    unknown = set(args.cases) - set(CASES)
    if unknown:
        p.error(f"unknown case(s) {sorted(unknown)}: choose from {sorted(CASES)}")
    if args.out is None:
        args.out = _common.RESULTS / f"train_{'gpu' if gpu else 'cpu'}.json"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    started = time.perf_counter()
    result = run(args)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    _common.write_json(args.out, result)
    print(f"wrote {args.out} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

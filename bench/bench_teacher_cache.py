"""KD-CNN with an AST teacher: students from the teacher cache vs the teacher run online.

    .venv/bin/python bench/bench_teacher_cache.py                 # CPU: AST-B/16 teacher, B0
    .venv/bin/python bench/bench_teacher_cache.py --size cpu_10s  # the same on 1,024 frames
    .venv/bin/python bench/bench_teacher_cache.py --size dry      # seconds (the test's size)

Everything through the real commands, in one run on one machine: prep-made shards, a teacher
export written by ``python -m cmkd_scale.train`` (AST at its real width; speed does not depend
on its weights), then

1. **online**: the EfficientNet student with ``teacher.checkpoint`` (the teacher in every step);
2. **cache pass**: ``python -m cmkd_scale.teacher_cache`` with full logits and with top K;
3. **cached**: the same student with ``teacher.cache`` (full, then top K): the teacher is not
   built; same seed, same views, same batches.

Figures: training clips/s of each run (the trainer's own per-step ``clips_per_s``, median
after warm-up steps) and their ratio; the teacher's share of an online step; teacher-pass
(sample, view) rows/s; cache bytes per clip per view (full and top K) and for full AudioSet
(2 M clips) at the README's V and K; the KD loss of the top-K cache against full logits at
the same step; and, from counted FLOPs (``FlopCounterMode``), the speed-up projected to the
full sizes on a GPU (AST-B/16 teacher forward at 1,024 frames vs an EfficientNet-B2 training
step), assuming both run at the same MFU.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common
import torch

RESULTS = _common.RESULTS  # teacher_cache_<size>.json
AUDIOSET_CLIPS = 2_000_000
RECOMMENDED = {"views": 5, "top_k": 32}  # README: V = the student's epochs, K = 32


@dataclass(frozen=True)
class Size:
    clips: int
    clip_s: float
    target_length: int
    teacher: tuple[str, ...]  # the AST teacher's model.* settings
    student: str
    micro_batch: int
    steps: int
    warmup: int
    views: int
    top_k: int


AST_B = (
    "arch=ast",
    "name=deit_base_distilled_patch16_384",
    "fstride=10",
    "tstride=10",
    "embed_dim=0",
    "depth=0",
    "num_heads=0",
)  # the real width (debug_cpu.yaml is tiny)
SIZES = {
    # AST-B/16 at its real width and depth on 2 s clips; EfficientNet-B0 student
    "cpu": Size(64, 2.0, 200, AST_B, "efficientnet_b0", 4, 10, 3, 2, 32),
    # the same at the recipes' input: 10 s clips, 1,024 frames
    "cpu_10s": Size(32, 10.0, 1024, AST_B, "efficientnet_b0", 4, 8, 2, 2, 32),
    "dry": Size(16, 1.5, 128, (*AST_B, "embed_dim=64", "depth=2", "num_heads=2"),
                "efficientnet_b0", 2, 3, 1, 2, 16),
}  # fmt: skip


def sh(cmd: list[str], log: Path, timeout: float = 3600) -> tuple[str, float]:
    """Run a command (output to ``log``); its output and wall seconds; raise on failure."""
    start = time.perf_counter()
    proc = subprocess.run(
        [str(c) for c in cmd],
        cwd=_common.ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
    )
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({log}):\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr, time.perf_counter() - start


def _env() -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    env["PYTHONPATH"] = str(_common.ROOT)
    return env


def common(size: Size, shards: Path, eval_shards: Path) -> list[str]:
    return [
        f"data.train={shards}",
        f"data.eval={eval_shards}",
        f"data.target_length={size.target_length}",
        "data.mixup=0.5",
        f"data.freqm={min(48, size.target_length // 8)}",
        f"data.timem={min(192, size.target_length // 5)}",
        f"data.views={size.views}",
        "data.num_threads=1",
        "data.device=auto",
        "tracking.enabled=false",
        "deepspeed.zero_stage=0",
        f"deepspeed.micro_batch={size.micro_batch}",
        f"deepspeed.global_batch={size.micro_batch}",
        f"optim.reference_batch={size.micro_batch}",
        "optim.warmup_steps=0",
        "run.log_every_steps=1",
        "run.checkpoint_every_steps=0",
        "eval.teacher=false",
    ]


def train(size: Size, base: list[str], run_dir: Path, *extra: str) -> tuple[str, float]:
    cmd = [sys.executable, "-m", "cmkd_scale.train", "--config", _common.ROOT / "configs" /
           "debug_cpu.yaml", f"run.dir={run_dir}", *base, *extra]  # fmt: skip
    return sh(cmd, run_dir.with_suffix(".log"))


def step_records(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "clips_per_s" in r]


def steady(records: list[dict[str, Any]], key: str, warmup: int) -> float:
    return statistics.median(r[key] for r in records[warmup:])


def student_run(size: Size, base: list[str], run_dir: Path, *teacher: str) -> dict[str, Any]:
    _, wall = train(
        size, base, run_dir, *student_model(size), f"run.max_steps={size.steps}", *teacher
    )
    records = step_records(run_dir)
    return {
        "clips_per_s": steady(records, "clips_per_s", size.warmup),
        "teacher_ms": steady(records, "teacher_ms", size.warmup),
        "kd_loss": [r["kd_loss"] for r in records],
        "wall_s": round(wall, 1),
    }


def student_model(size: Size) -> list[str]:
    return ["model.arch=efficientnet", f"model.name={size.student}", "model.pooling=attention"]


def cache_pass(
    size: Size, config: Path, base: list[str], out: Path, teacher: Path, top_k: int
) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "cmkd_scale.teacher_cache", "--config", config, "--out", out,
           "--top-k", top_k, "--batch-size", 8, *base, f"teacher.checkpoint={teacher}"]  # fmt: skip
    output, wall = sh(cmd, out.with_suffix(".log"))
    rates = re.findall(r"teacher cache: \d+/\d+ \(sample, view\) rows, ([\d.]+) rows/s", output)
    size_bytes = sum(p.stat().st_size for p in out.glob("part-*.npy"))
    return {
        "rows_per_s": float(rates[-1]),
        "wall_s": round(wall, 1),
        "bytes": size_bytes,
        "bytes_per_clip_per_view": size_bytes / (size.clips * size.views),
    }


def count_flops() -> dict[str, float]:
    """FLOPs per clip at the full sizes: AST-B/16 teacher forward (1,024 x 128, stride 10) and
    an EfficientNet-B2 (PSLA attention pooling) training step (forward + backward)."""
    from _flops import flop_counter

    from cmkd_scale.config import ModelConfig
    from cmkd_scale.models import build_model

    x = torch.randn(1, 1024, 128)
    ast = build_model(ModelConfig(arch="ast", name="deit_base_distilled_patch16_384"),
                      num_classes=527, input_tdim=1024, input_fdim=128).eval()  # fmt: skip
    with torch.no_grad(), flop_counter() as counter:
        ast(x)
    teacher = counter.get_total_flops()
    del ast
    cnn = build_model(ModelConfig(arch="efficientnet", name="efficientnet_b2"),
                      num_classes=527, input_tdim=1024, input_fdim=128).train()  # fmt: skip
    with flop_counter() as counter:
        cnn(x).sum().backward()
    return {
        "teacher_forward": float(teacher),
        "student_train_step": float(counter.get_total_flops()),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    size = SIZES[args.size]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_cache_"))
    work.mkdir(parents=True, exist_ok=True)
    shards = _common.make_shards(work / "train", clips=size.clips, duration_s=size.clip_s)
    eval_shards = _common.make_shards(work / "eval", clips=4, duration_s=size.clip_s)
    base = common(size, shards, eval_shards)
    # the teacher export: one training step of the AST (its weights do not change its speed)
    teacher_dir = work / "teacher"
    train(size, base, teacher_dir, "teacher=none", "run.max_steps=1", "eval.teacher=false",
          *(f"model.{o}" for o in size.teacher))  # fmt: skip
    teacher = teacher_dir / "models" / "final.pt"
    config = work / "student.yaml"
    from cmkd_scale.config import load_config

    config.write_text(load_config(_common.ROOT / "configs" / "debug_cpu.yaml",
                                  [*base, *student_model(size)]).to_yaml())  # fmt: skip
    teacher_arg = f"teacher.checkpoint={teacher}"
    online = student_run(size, base, work / "online", teacher_arg)
    full = cache_pass(size, config, base, work / "cache_full", teacher, 0)
    topk = cache_pass(size, config, base, work / "cache_topk", teacher, size.top_k)

    def from_cache(name: str) -> dict[str, Any]:  # teacher.checkpoint: checked, not built
        cache = f"teacher.cache={work / name}"
        return student_run(size, base, work / name.replace("cache", "cached"), teacher_arg, cache)

    cached, cached_k = from_cache("cache_full"), from_cache("cache_topk")
    flops = count_flops()
    per_row_full = 527 * 2
    per_row_k = RECOMMENDED["top_k"] * 4 + 2
    rows = AUDIOSET_CLIPS * RECOMMENDED["views"]
    kd, kd_k, kd_online = cached["kd_loss"], cached_k["kd_loss"], online["kd_loss"]
    result = {
        "machine": _common.machine_info(),
        "size": args.size,
        "setup": {
            "clips": size.clips,
            "target_length": size.target_length,
            "teacher": " ".join(size.teacher),
            "student": size.student,
            "micro_batch": size.micro_batch,
            "steps": size.steps,
            "warmup_steps_left_out": size.warmup,
            "views": size.views,
            "top_k": size.top_k,
        },
        "online_clips_per_s": round(online["clips_per_s"], 3),
        "cached_clips_per_s": round(cached["clips_per_s"], 3),
        "cached_topk_clips_per_s": round(cached_k["clips_per_s"], 3),
        "speedup_cached_vs_online": round(cached["clips_per_s"] / online["clips_per_s"], 2),
        "online_teacher_ms_per_step": round(online["teacher_ms"], 1),
        "cached_lookup_ms_per_step": round(cached["teacher_ms"], 3),
        "teacher_pass_rows_per_s": full["rows_per_s"],
        "teacher_pass_wall_s": full["wall_s"],
        "cache_bytes_per_clip_per_view": {
            "full": round(full["bytes_per_clip_per_view"], 1),
            f"top{size.top_k}": round(topk["bytes_per_clip_per_view"], 1),
        },
        "kd_loss_full_vs_online_step1_rel": abs(kd[0] - kd_online[0]) / kd_online[0],
        "kd_loss_topk_vs_full_step1_rel": abs(kd_k[0] - kd[0]) / kd[0],
        "kd_loss_topk_vs_full_mean_rel": statistics.mean(
            abs(a - b) / b for a, b in zip(kd_k, kd, strict=True)
        ),
        "audioset": {
            "clips": AUDIOSET_CLIPS,
            **RECOMMENDED,
            "full_logits_gb": round(rows * per_row_full / 1e9, 1),
            f"top{RECOMMENDED['top_k']}_gb": round(rows * per_row_k / 1e9, 2),
        },
        "flops_per_clip": flops,
        "projected_speedup_full_sizes": round(
            (flops["teacher_forward"] + flops["student_train_step"]) / flops["student_train_step"],
            1,
        ),
    }
    _common.write_json(args.out, result)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", choices=sorted(SIZES), default="cpu")
    p.add_argument("--workdir", default="", help="keep shards and runs here (default: a temp dir)")
    p.add_argument(
        "--out", type=Path, default=None, help="default: results/teacher_cache_SIZE.json"
    )
    args = p.parse_args(argv)
    args.out = args.out or RESULTS / f"teacher_cache_{args.size}.json"
    r = run(args)
    print(json.dumps({k: v for k, v in r.items() if k != "machine"}, indent=2))
    print(
        f"KD-CNN from the cache: {r['cached_clips_per_s']:.2f} clips/s vs online "
        f"{r['online_clips_per_s']:.2f} ({r['speedup_cached_vs_online']:.1f}x); projected at the "
        f"full sizes from counted FLOPs: {r['projected_speedup_full_sizes']:.1f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

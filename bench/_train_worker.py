"""One rank of the training benchmark: the real Trainer's step, timed phase by phase.

Launched by bench_train.py (``torch.distributed.run`` on CPU, one process per GPU), never by
hand. It builds ``cmkd_scale.train.Trainer`` from a YAML config (DALI TrainLoader on shards,
DeepSpeed engine, FrozenTeacher, DistillLoss) and drives ``Trainer._micro_step`` itself:

  kd        the real micro-step, untimed inside: clips/s, data-wait share, peak memory;
  student   the same with the teacher taken out of the step (teacher overhead, same run);
  split     the real micro-step with timers around teacher / student forward / backward /
            optimizer (``torch.cuda.synchronize`` at each boundary on a GPU);
  flops     torch.utils.flop_counter.FlopCounterMode over one micro-step and one teacher call;
  reference plain PyTorch (DDP + torch.optim.Adam + autocast, AST's way) on the same batches.

``--probe B`` instead runs two micro-steps of batch B on random inputs and reports whether they
fit in memory (GPU memory, or on CPU an address-space cap) for the largest-batch search.
Rank 0 writes every rank's figures as one JSON file.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import resource
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import _common  # noqa: F401  (puts the project on sys.path)
import torch
from _flops import flop_counter

from cmkd_scale import dist
from cmkd_scale.config import load_config
from cmkd_scale.data.loader import Batch
from cmkd_scale.logs import setup_logging
from cmkd_scale.train import engine
from cmkd_scale.train.trainer import Trainer

log = logging.getLogger("bench.train_worker")


def endless(trainer: Trainer) -> Iterator[Batch]:
    """The trainer's batches, epoch after epoch (the loader rebuilds DALI per epoch)."""
    epoch = 0
    while True:
        yield from trainer.train_loader.epoch_batches(epoch)
        epoch += 1


class Clock:
    """Wall clock that waits for the GPU's queued work first (a CPU-GPU sync point)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


class DataWait:
    """Time spent waiting for batches; epoch starts (DALI pipeline rebuilt) counted apart.

    The benchmark's small shard set starts a new epoch every few dozen steps; on full AudioSet
    an epoch is ~1.8 M clips, so the steady share is the one a real run sees.
    """

    def __init__(self, trainer: Trainer) -> None:
        self.loader = trainer.train_loader
        self.total = self.at_epoch_start = 0.0
        self.epoch_starts = 0

    def next(self, batches: Iterator[Batch]) -> Batch:
        starts_epoch = self.loader.step == 0
        t0 = time.perf_counter()
        batch = next(batches)
        waited = time.perf_counter() - t0
        self.total += waited
        if starts_epoch:
            self.at_epoch_start += waited
            self.epoch_starts += 1
        return batch

    def fractions(self, wall: float) -> dict[str, float]:
        return {
            "data_wait_frac": self.total / wall,
            "data_wait_frac_steady": (self.total - self.at_epoch_start) / wall,
            "epoch_starts": self.epoch_starts,
        }


def run_steps(
    trainer: Trainer, batches: Iterator[Batch], steps: int, clock: Clock
) -> dict[str, float]:
    """``steps`` real micro-steps; wall time, data wait and clips/s over all ranks."""
    wait = DataWait(trainer)
    start = clock()
    for _ in range(steps):
        trainer._micro_step(wait.next(batches))
    wall = clock() - start
    clips = steps * trainer.cfg.deepspeed.micro_batch * trainer.env.world_size
    return {
        "steps": steps,
        "wall_s": wall,
        "step_ms": 1000 * wall / steps,
        "clips_per_s": clips / wall,
        **wait.fractions(wall),
    }


@contextlib.contextmanager
def phase_timers(trainer: Trainer, clock: Clock) -> Iterator[dict[str, float]]:
    """Time the engine's forward, backward and step (instance-level wrappers, removed after)."""
    totals = dict.fromkeys(("forward", "backward", "optimizer"), 0.0)
    eng = trainer.engine

    def timed(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = clock()
            out = fn(*args, **kwargs)
            totals[name] += clock() - t0
            return out

        return wrapper

    originals = {"forward": eng.forward, "backward": eng.backward, "step": eng.step}
    eng.forward = timed(eng.forward, "forward")
    eng.backward = timed(eng.backward, "backward")
    eng.step = timed(eng.step, "optimizer")
    try:
        yield totals
    finally:
        for name in originals:
            delattr(eng, name)


def split_steps(
    trainer: Trainer, batches: Iterator[Batch], steps: int, clock: Clock
) -> dict[str, float]:
    """Per-micro-step milliseconds: data wait, teacher, forward, backward, optimizer, other."""
    teacher = 0.0
    wait = DataWait(trainer)
    with phase_timers(trainer, clock) as totals:
        start = clock()
        for _ in range(steps):
            trainer._micro_step(wait.next(batches))
            teacher += trainer.teaching.last_ms / 1000
        wall = clock() - start
    parts = {"data_wait": wait.total, "teacher": teacher, **totals}
    parts["other"] = wall - sum(parts.values())  # loss, the flag all-reduce, copies
    out = {f"{name}_ms": 1000 * value / steps for name, value in parts.items()}
    out["step_ms"] = 1000 * wall / steps
    return out


def count_flops(trainer: Trainer, batch: Batch) -> dict[str, float]:
    """FLOPs of one micro-step (teacher fwd + student fwd/bwd) and of the teacher alone."""
    with flop_counter() as counter:
        trainer._micro_step(batch)
    step = float(counter.get_total_flops())
    teacher = 0.0
    if trainer.teaching.online is not None:
        fbank = batch.fbank.to(trainer.device)
        with flop_counter() as counter:
            trainer.teaching.online(fbank)
        teacher = float(counter.get_total_flops())
    return {"step": step, "teacher": teacher, "student": step - teacher}


def memory_now(device: torch.device) -> dict[str, float]:
    """Peak memory so far: GPU allocator peaks, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return {
            "kind": "gpu_peak_allocated",
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
        }
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    return {"kind": "cpu_peak_rss", "peak_gib": rss_kib / 2**20}


def reference_steps(
    trainer: Trainer, batches: Iterator[Batch], warmup: int, steps: int, clock: Clock
) -> dict[str, float]:
    """AST's way on the same batches: DDP student, torch Adam, autocast, same teacher+loss."""
    from cmkd_scale.models import build_model

    cfg = trainer.cfg
    dims = {"input_tdim": cfg.data.target_length, "input_fdim": cfg.data.num_mel_bins}
    model = build_model(cfg.model, num_classes=trainer.num_classes, **dims).to(trainer.device)
    if trainer.env.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam(
        model.parameters(),
        lr=cfg.optim.lr,
        betas=cfg.optim.betas,
        weight_decay=cfg.optim.weight_decay,
    )
    dtype = trainer.dtype
    autocast = torch.autocast(trainer.device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step(batch: Batch) -> None:
        fbank = batch.fbank.to(trainer.device, non_blocking=True)
        labels = batch.labels.to(trainer.device, non_blocking=True)
        teacher_logits = trainer.teaching.logits(batch, fbank)
        with autocast:
            logits = model(fbank).float()
        loss = trainer.loss_fn(logits, labels, teacher_logits).total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        float(loss.detach())  # AST reads the loss every step (a sync, like our all-reduce)

    for _ in range(warmup):
        step(next(batches))
    wait = DataWait(trainer)
    start = clock()
    for _ in range(steps):
        step(wait.next(batches))
    wall = clock() - start
    clips = steps * cfg.deepspeed.micro_batch * trainer.env.world_size
    return {
        "steps": steps,
        "wall_s": wall,
        "step_ms": 1000 * wall / steps,
        "clips_per_s": clips / wall,
        **wait.fractions(wall),
    }


def measure(trainer: Trainer, args: argparse.Namespace) -> dict[str, Any]:
    """All phases on this rank, in one run."""
    from _common import peak_flops

    device = trainer.device
    clock = Clock(device)
    dist.barrier()
    peak, peak_source = peak_flops(device, trainer.dtype)  # every rank at once, like training
    batches = endless(trainer)
    out: dict[str, Any] = {"rank": trainer.env.rank, "peak_flops": peak, "peak_source": peak_source}

    run_steps(trainer, batches, args.warmup, clock)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out["kd"] = run_steps(trainer, batches, args.steps, clock)
    out["memory"] = memory_now(device)
    teacher, trainer.teaching.online = trainer.teaching.online, None
    try:
        out["student_only"] = run_steps(trainer, batches, args.steps, clock)
    finally:
        trainer.teaching.online = teacher
    out["split"] = split_steps(trainer, batches, args.steps, clock)
    out["flops"] = count_flops(trainer, next(batches))
    if args.reference:
        out["reference"] = reference_steps(trainer, batches, args.warmup, args.steps, clock)
    return out


def probe(trainer: Trainer, micro_batch: int, mem_cap_gib: float) -> dict[str, Any]:
    """Two micro-steps of ``micro_batch`` random clips: do they fit in memory?"""
    cfg, device = trainer.cfg, trainer.device
    if device.type == "cpu" and mem_cap_gib > 0:
        limit = _address_space() + int(mem_cap_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
    shape = (micro_batch, cfg.data.target_length, cfg.data.num_mel_bins)
    try:
        for _ in range(2):
            batch = Batch(
                fbank=torch.randn(shape, device=device),
                labels=(torch.rand(micro_batch, trainer.num_classes, device=device) < 0.05).float(),
                keys=[f"probe{i}" for i in range(micro_batch)],
                index=torch.arange(micro_batch),
                valid=torch.ones(micro_batch, dtype=torch.bool),
            )
            trainer._micro_step(batch)
    except (torch.OutOfMemoryError, RuntimeError, MemoryError) as exc:
        if not _is_oom(exc, capped=device.type == "cpu" and mem_cap_gib > 0):
            raise
        return {"micro_batch": micro_batch, "fits": False, "error": str(exc).splitlines()[0]}
    return {"micro_batch": micro_batch, "fits": True, "memory": memory_now(device)}


def _address_space() -> int:
    """This process's current virtual size in bytes (the CPU cap is set on top of it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status: the CPU memory cap needs Linux")


def _is_oom(exc: BaseException, *, capped: bool) -> bool:
    """An out-of-memory failure (under a CPU cap, oneDNN reports its failed allocations as
    'could not create a primitive')."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    signs = ["out of memory", "not enough memory", "can't allocate"]
    if capped:
        signs.append("could not create a primitive")
    return any(s in text for s in signs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, required=True, help="resolved YAML of this case")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--reference", action="store_true", help="also time plain PyTorch (DDP)")
    p.add_argument("--probe", type=int, default=0, help="micro batch to try (memory search)")
    p.add_argument("--mem-cap-gib", type=float, default=0.0, help="CPU probe: memory cap")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    setup_logging()
    engine.ds_env_defaults()
    overrides = list(args.overrides)
    if args.probe:
        overrides.append(f"deepspeed.micro_batch={args.probe}")
    cfg = load_config(args.config, overrides)
    trainer = Trainer(cfg)
    try:
        if args.probe:
            result = probe(trainer, args.probe, args.mem_cap_gib)
        else:
            result = measure(trainer, args)
        ranks = dist.gather_objects(result)
        if trainer.is_main:
            args.out.write_text(json.dumps({"ranks": ranks}, indent=2) + "\n")
    finally:
        dist.destroy()


if __name__ == "__main__":
    main()

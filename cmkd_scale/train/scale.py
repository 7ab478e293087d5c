"""The batch a run trains with, and what the learning rate does when it is not the recipe's.

A recipe states the reference quantity: ``deepspeed.global_batch`` clips per optimizer step over
all ranks (AST: 12, PSLA: 100 on AudioSet). ``deepspeed.micro_batch`` is the per-rank memory
knob and ``grad_accum`` follows from the world size, ``global = micro × accum × world``:

- ``global_batch > 0, grad_accum = 0`` (the recipes): each rank takes ``global / world`` clips
  per step, as the largest micro-batch ≤ ``micro_batch`` that divides them, times ``grad_accum``.
  A world size that does not divide the global batch is refused, naming the nearest valid
  world sizes and global batches.
- ``global_batch > 0, grad_accum > 0``: an explicit split; ``micro_batch × grad_accum × world``
  must equal ``global_batch``.
- ``global_batch = 0``: ``micro_batch × grad_accum × world`` (``grad_accum`` 0 = 1), whatever
  it comes to.

``optim.reference_batch`` is the global batch ``optim.lr`` and ``optim.warmup_steps`` were
tuned for. A run at another global batch says so in one warning line; with
``optim.lr_scaling: linear | sqrt`` the lr (and ``min_lr``) is multiplied by ``k`` or ``√k``
(``k = global / reference``) and the warm-up keeps its number of clips (``warmup_steps / k``
steps, rounded, at least 1).

This module imports no torch: ``python -m cmkd_scale.train`` and ``launch/train.sbatch``
resolve the plan for the world size before any heavy import (well under a second).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cmkd_scale.config import Config, ConfigError, OptimConfig


class BatchSplitError(ConfigError):
    """The global batch cannot be split over this world size as configured."""


def world_size_from_env(env: Mapping[str, str] | None = None) -> int:
    """The world size the launcher announces (torchrun's WORLD_SIZE, SLURM_NTASKS, else 1).

    Same precedence as :func:`cmkd_scale.dist.resolve_dist_env`, without importing torch.
    """
    env = os.environ if env is None else env
    for rank_var, world_var in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank_var in env and world_var in env:
            try:
                return max(int(env[world_var]), 1)
            except ValueError:
                raise ConfigError(f"environment variable {world_var}={env[world_var]!r}") from None
    return 1


@dataclass(frozen=True)
class ScalePlan:
    """The resolved batch split and optimizer settings of one run at one world size."""

    world_size: int
    global_batch: int  # clips per optimizer step, all ranks together
    micro_batch: int  # clips per rank per forward/backward
    grad_accum: int  # micro-batches per optimizer step
    reference_batch: int  # the global batch optim.lr was tuned for (0 = not stated)
    lr_scaling: str
    lr: float  # effective peak lr
    warmup_steps: int  # effective warm-up, in optimizer steps
    min_lr: float

    @property
    def factor(self) -> float:
        """global / reference batch (1 when no reference is stated)."""
        return self.global_batch / self.reference_batch if self.reference_batch else 1.0

    def optim(self, cfg: OptimConfig) -> OptimConfig:
        """``cfg`` with the effective lr, min_lr and warm-up (what the scheduler runs)."""
        return dataclasses.replace(
            cfg, lr=self.lr, warmup_steps=self.warmup_steps, min_lr=self.min_lr
        )

    def params(self) -> dict[str, Any]:
        """The derived values, for MLflow beside ``cfg.flat()``."""
        return {
            "effective.world_size": self.world_size,
            "effective.global_batch": self.global_batch,
            "effective.micro_batch": self.micro_batch,
            "effective.grad_accum": self.grad_accum,
            "effective.lr": self.lr,
            "effective.warmup_steps": self.warmup_steps,
        }

    def describe(self) -> str:
        return (
            f"global batch {self.global_batch} = micro_batch {self.micro_batch} x grad_accum "
            f"{self.grad_accum} x {self.world_size} rank(s); lr {self.lr:.4g}, warm-up "
            f"{self.warmup_steps} steps"
        )

    def warning(self, cfg: OptimConfig) -> str | None:
        """One line when the global batch is not the reference one; None when it is."""
        if not self.reference_batch or self.global_batch == self.reference_batch:
            return None
        head = (
            f"global batch {self.global_batch} differs from the reference batch "
            f"{self.reference_batch} (optim.reference_batch) that optim.lr was tuned for: "
        )
        if self.lr_scaling == "none":
            return head + (
                f"lr {cfg.lr:.4g} and warm-up {cfg.warmup_steps} steps unchanged "
                "(optim.lr_scaling=none); this is not the reference recipe"
            )
        return head + (
            f"lr {cfg.lr:.4g} -> {self.lr:.4g} ({self.lr_scaling} scaling, x{self.lr / cfg.lr:.4g}"
            f"), warm-up {cfg.warmup_steps} -> {self.warmup_steps} steps (same clips); "
            "scaled, not verified against the reference"
        )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _nearest(values: list[int], target: int) -> list[int]:
    below = [v for v in values if v <= target]
    above = [v for v in values if v >= target]
    picks = ([max(below)] if below else []) + ([min(above)] if above else [])
    return sorted(set(picks))


def _split_hint(global_batch: int, world: int, micro_cap: int) -> str:
    """The nearest settings that split exactly: world sizes, global batches."""
    worlds = _nearest(_divisors(global_batch), world)
    lower = (global_batch // world) * world
    batches = sorted({b for b in (lower, lower + world) if b > 0})
    world_text = " or ".join(
        f"{w} ranks (micro_batch {_best_micro(global_batch // w, micro_cap)} x grad_accum "
        f"{global_batch // w // _best_micro(global_batch // w, micro_cap)})"
        for w in worlds
    )
    batch_text = " or ".join(f"deepspeed.global_batch={b}" for b in batches)
    return (
        f"nearest valid: {world_text} at the reference batch; or {batch_text} on {world} ranks "
        "(not the reference: add optim.lr_scaling=linear or sqrt to adapt the lr); "
        f"world sizes that divide {global_batch}: {', '.join(map(str, _divisors(global_batch)))}"
    )


def _best_micro(per_rank: int, cap: int) -> int:
    """The largest divisor of ``per_rank`` that is at most ``cap``."""
    return max(d for d in _divisors(per_rank) if d <= max(cap, 1))


def resolve_batch(cfg: Config, world_size: int) -> tuple[int, int, int]:
    """``(global_batch, micro_batch, grad_accum)`` for ``world_size`` ranks, or BatchSplitError."""
    ds = cfg.deepspeed
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if ds.global_batch == 0:
        accum = ds.grad_accum or 1
        return ds.micro_batch * accum * world_size, ds.micro_batch, accum
    total = ds.global_batch
    if ds.grad_accum:
        if ds.micro_batch * ds.grad_accum * world_size == total:
            return total, ds.micro_batch, ds.grad_accum
        got = ds.micro_batch * ds.grad_accum * world_size
        alt = ""
        if total % world_size == 0:
            micro = _best_micro(total // world_size, ds.micro_batch)
            alt = (
                f"deepspeed.grad_accum=0 (derived: micro_batch {micro} x grad_accum "
                f"{total // world_size // micro}) or "
            )
        raise BatchSplitError(
            f"config keys 'deepspeed.micro_batch/grad_accum/global_batch': micro_batch "
            f"{ds.micro_batch} x grad_accum {ds.grad_accum} x {world_size} rank(s) = {got}, not "
            f"global_batch {total}; use {alt}deepspeed.global_batch=0 (micro x accum x world, "
            f"as given). " + (_split_hint(total, world_size, ds.micro_batch))
        )
    if total % world_size:
        raise BatchSplitError(
            f"config key 'deepspeed.global_batch': {total} clips per optimizer step cannot be "
            f"split evenly over {world_size} ranks; "
            + _split_hint(total, world_size, ds.micro_batch)
        )
    per_rank = total // world_size
    micro = _best_micro(per_rank, ds.micro_batch)
    return total, micro, per_rank // micro


def resolve_scale(cfg: Config, world_size: int) -> ScalePlan:
    """The run's batch split and effective lr / warm-up at ``world_size`` ranks."""
    global_batch, micro, accum = resolve_batch(cfg, world_size)
    if cfg.run.nonfinite_loss == "skip" and accum > 1:
        # DeepSpeed counts micro-batches itself: one left out of backward/step moves every
        # later accumulation boundary, and an epoch would end inside an optimizer step.
        raise ConfigError(
            "config keys 'run.nonfinite_loss' and 'deepspeed.grad_accum': skipping non-finite "
            f"batches needs grad_accum=1, got {accum} (micro_batch {micro} on {world_size} "
            "rank(s)); set run.nonfinite_loss=stop, or deepspeed.grad_accum=1 with a larger "
            "micro_batch"
        )
    opt = cfg.optim
    reference = opt.reference_batch
    lr, warmup, min_lr = opt.lr, opt.warmup_steps, opt.min_lr
    if reference and global_batch != reference and opt.lr_scaling != "none":
        k = global_batch / reference
        mult = k if opt.lr_scaling == "linear" else math.sqrt(k)
        lr, min_lr = opt.lr * mult, opt.min_lr * mult
        if opt.warmup_steps:
            warmup = max(1, round(opt.warmup_steps / k))
    return ScalePlan(
        world_size=world_size,
        global_batch=global_batch,
        micro_batch=micro,
        grad_accum=accum,
        reference_batch=reference,
        lr_scaling=opt.lr_scaling,
        lr=lr,
        warmup_steps=warmup,
        min_lr=min_lr,
    )


def check_supported(cfg: Config, world_size: int | None = None) -> ScalePlan:
    """Refuse settings the training loop cannot honour; the batch/lr plan for ``world_size``.

    ``world_size`` None: the launcher's (WORLD_SIZE / SLURM_NTASKS, else 1). An impossible
    batch split and non-finite skipping with gradient accumulation are refused here.
    """
    plan = resolve_scale(cfg, world_size or world_size_from_env())
    if not cfg.data.eval:
        raise ConfigError(
            "config key 'data.eval': every run ends with its report on the eval set; set "
            "data.eval (and data.val for the set that chooses the model)"
        )
    return plan

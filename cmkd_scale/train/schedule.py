"""Learning-rate schedules as pure functions of the optimizer step.

AST / PSLA recipe: linear warm-up over the first ``warmup_steps`` optimizer steps, then a step
decay by epoch (full AudioSet: x0.5 after epochs 2, 3, 4, 5 -> ``decay_start_epoch: 2``,
``decay_every_epochs: 1``, ``decay_rate: 0.5``).  Cosine and constant are options.  Because
the factor depends only on the step, a resumed run gets exactly the same learning rates.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from cmkd_scale.config import OptimConfig


def decay_factor(cfg: OptimConfig, epoch: int) -> float:
    """AST's step decay for 1-based ``epoch``: ``rate ** (#milestones passed)``.

    Milestones sit at the END of epochs decay_start, decay_start + every, ... (AST steps
    ``MultiStepLR([2, 3, 4, 5])`` after each epoch), so epoch 3 is the first one decayed.
    """
    finished = epoch - 1
    if finished < cfg.decay_start_epoch:
        return 1.0
    passed = (finished - cfg.decay_start_epoch) // cfg.decay_every_epochs + 1
    return cfg.decay_rate**passed


def lr_factor(cfg: OptimConfig, step: int, *, steps_per_epoch: int, total_steps: int) -> float:
    """Multiplier of ``cfg.lr`` for 0-based optimizer ``step``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        return decay_factor(cfg, step // max(steps_per_epoch, 1) + 1)
    # cosine from the end of warm-up down to min_lr at total_steps
    span = max(total_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    floor = cfg.min_lr / cfg.lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: Optimizer, cfg: OptimConfig, *, steps_per_epoch: int, total_steps: int
) -> LambdaLR:
    """A LambdaLR over ``optimizer`` (DeepSpeed steps it once per optimizer step)."""

    def factor(step: int) -> float:
        return lr_factor(cfg, step, steps_per_epoch=steps_per_epoch, total_steps=total_steps)

    return LambdaLR(optimizer, factor)

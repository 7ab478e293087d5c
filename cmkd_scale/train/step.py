"""What a micro-batch ends with on every rank, and how an epoch of the loop ends.

After each micro-batch ONE all-reduce carries the losses (for logging), a non-finite flag and
the preemption flag, so every rank skips or stops at the same step. ``Agreement`` names that
tensor's fields; ``EpochEnd`` names why ``Trainer._train_epoch`` returned.
"""

from __future__ import annotations

import enum
from dataclasses import astuple, dataclass, fields

import torch


class EpochEnd(enum.Enum):
    """Why the loop left an epoch."""

    DONE = "epoch_end"  # the epoch's micro-batches are used up: evaluate, checkpoint, export
    MAX_STEPS = "max_steps"  # run.max_steps reached inside the epoch
    PREEMPTED = "stop"  # every rank agreed to stop: checkpoint, exit for requeue


@dataclass(frozen=True)
class Agreement:
    """One micro-batch's values summed over the ranks (one all-reduce)."""

    loss: float
    label_loss: float
    kd_loss: float
    nonfinite_ranks: float  # ranks whose loss is NaN/Inf
    stopping_ranks: float  # ranks that received a preemption signal

    @classmethod
    def pack(
        cls,
        *,
        loss: torch.Tensor,
        label_loss: torch.Tensor,
        kd_loss: torch.Tensor,
        nonfinite: bool | torch.Tensor,
        stopping: bool,
        device: torch.device,
    ) -> torch.Tensor:
        """This rank's values as the float64 tensor to all-reduce (field order)."""
        values = {
            "loss": loss,
            "label_loss": label_loss,
            "kd_loss": kd_loss,
            "nonfinite_ranks": nonfinite,
            "stopping_ranks": stopping,
        }
        return torch.stack(
            [torch.as_tensor(values[f.name], device=device).double() for f in fields(cls)]
        )

    @classmethod
    def unpack(cls, summed: torch.Tensor) -> Agreement:
        """The all-reduced tensor, by name."""
        return cls(*(float(v) for v in summed.cpu()))

    @property
    def nonfinite(self) -> bool:
        """Some rank's loss is not finite: every rank skips (or stops)."""
        return self.nonfinite_ranks > 0

    @property
    def stop(self) -> bool:
        """Some rank was signalled: every rank stops after this optimizer step."""
        return self.stopping_ranks > 0

    def mean_losses(self, world_size: int) -> torch.Tensor:
        """[loss, label loss, KD loss] averaged over the ranks (what the step meter adds)."""
        return torch.tensor(astuple(self)[:3], dtype=torch.float64) / world_size

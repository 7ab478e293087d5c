"""Where a training step's teacher logits come from: the frozen teacher run online on the
student's batch, a teacher cache (``teacher.cache``: the logits of the batch's (sample, view)
pairs, no model built), or nowhere (``teacher: none``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from cmkd_scale.config import Config

if TYPE_CHECKING:
    from cmkd_scale.data.loader import Batch
    from cmkd_scale.distill.logit_cache import CachedTeacher
    from cmkd_scale.distill.teacher import FrozenTeacher


class Teaching:
    """The run's teacher, whichever way it teaches."""

    def __init__(
        self,
        cfg: Config,
        *,
        shard_list: list[dict[str, Any]],
        num_classes: int,
        device: torch.device,
    ) -> None:
        from cmkd_scale.distill.logit_cache import open_cached_teacher
        from cmkd_scale.distill.teacher import build_teacher

        self.online: FrozenTeacher | None = None  # a model: also evaluated beside the student
        self.cached: CachedTeacher | None = None
        if cfg.teacher.cache:  # the teacher's logits of every (sample, view), computed once
            self.cached = open_cached_teacher(cfg, shard_list, device)
        else:  # fed through its own input settings (exact, or refused)
            self.online = build_teacher(
                cfg.teacher,
                num_classes=num_classes,
                device=device,
                student=cfg.data,
                input_tdim=cfg.data.target_length,
                input_fdim=cfg.data.num_mel_bins,
            )

    def logits(self, batch: Batch, fbank: torch.Tensor) -> torch.Tensor | None:
        """The teacher's logits for this batch (``fbank``: its features on the device)."""
        if self.cached is not None:
            return self.cached(batch.index, batch.view)
        if self.online is not None:
            return self.online(fbank)
        return None

    @property
    def last_ms(self) -> float:
        """Milliseconds of the last call (forward, or cache lookup)."""
        teacher = self.cached or self.online
        return teacher.last_ms if teacher is not None else 0.0

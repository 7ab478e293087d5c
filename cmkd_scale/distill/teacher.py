"""The frozen teacher: eval mode pinned, no gradients, its own dtype, outside DeepSpeed.

It scores exactly the augmented batch the student sees; its forward time is measured per call
(``last_ms``) so the trainer can log the cost of distillation.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch
from torch import nn

from cmkd_scale.config import ModelConfig, TeacherConfig

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RANDOM_PREFIX = "random:"


def teacher_dtype(cfg: TeacherConfig, device: torch.device) -> torch.dtype:
    """``teacher.dtype`` with ``auto`` decided: bf16 on GPU, fp32 on CPU."""
    if cfg.dtype != "auto":
        return _DTYPES[cfg.dtype]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class FrozenTeacher(nn.Module):
    """Wraps a trained model so that nothing can train it by accident."""

    def __init__(self, model: nn.Module, *, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model.to(dtype=dtype)
        self.dtype = dtype
        self.last_ms = 0.0
        for param in self.model.parameters():
            param.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenTeacher:
        """Stay in eval mode whatever the caller asks (dropout/BN statistics stay frozen)."""
        return super().train(False)

    @torch.inference_mode()
    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        """Teacher logits (float32) for an augmented batch ``[B, T, F]``."""
        if fbank.device.type == "cuda":
            torch.cuda.synchronize(fbank.device)  # time the teacher alone, not queued work
        start = time.perf_counter()
        logits = self.model(fbank.to(self.dtype)).float()
        if fbank.device.type == "cuda":
            torch.cuda.synchronize(fbank.device)
        self.last_ms = (time.perf_counter() - start) * 1000.0
        # inference tensors cannot enter autograd; a plain clone can (as a constant)
        return logits.clone()


def build_teacher(
    cfg: TeacherConfig, *, num_classes: int, input_tdim: int, input_fdim: int, device: torch.device
) -> FrozenTeacher | None:
    """The frozen teacher from ``cfg.teacher`` (None when ``arch: none``)."""
    if cfg.arch == "none":
        return None
    from cmkd_scale.models import build_model
    from cmkd_scale.models.exported import Export
    from cmkd_scale.models.load import load_checkpoint_object, read_checkpoint

    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelConfig)}
    fields["name"] = cfg.name.removeprefix(RANDOM_PREFIX)
    raw = read_checkpoint(cfg.checkpoint) if cfg.checkpoint else None
    if Export.looks_like(raw):
        # Our export carries its architecture: the teacher is built exactly as it was trained
        # (and at this run's input size: load_checkpoint_object fits the position embedding).
        exported = Export.from_payload(raw, source=cfg.checkpoint).config.get("model", {})
        fields.update({k: v for k, v in exported.items() if k in fields and k != "checkpoint"})
        log.info("teacher architecture from its export: %s %s", fields["arch"], fields["name"])
    model_cfg = ModelConfig(**fields)
    model = build_model(
        model_cfg, num_classes=num_classes, input_tdim=input_tdim, input_fdim=input_fdim
    )
    if raw is not None:
        load_checkpoint_object(model, raw, source=cfg.checkpoint, strict=True)
        log.info("teacher %s loaded from %s", model_cfg.name, cfg.checkpoint)
    else:
        log.warning("teacher %s has RANDOM weights (tests only: %s)", cfg.name, RANDOM_PREFIX)
    dtype = teacher_dtype(cfg, device)
    teacher = FrozenTeacher(model.to(device), dtype=dtype)
    n_params = sum(p.numel() for p in teacher.parameters())
    log.info("teacher %s: %.2f M params, %s, frozen", cfg.name, n_params / 1e6, dtype)
    return teacher

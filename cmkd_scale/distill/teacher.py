"""The frozen teacher: eval mode pinned, no gradients, its own dtype, outside DeepSpeed.

It scores exactly the augmented batch the student sees; its forward time is measured per call
(``last_ms``) so the trainer can log the cost of distillation.

A teacher has its own input settings (mel bins, frames, normalisation): its export's ``data.*``,
or ``teacher.num_mel_bins/target_length/norm_mean/norm_std`` for a released model. The
student's batch is turned into what the teacher's own dataloader would have produced, where
that is exact (:class:`InputAdapter`), else the run is refused naming both settings:

- normalisation is affine on the shared log-mel ``f``: the pipeline feeds
  ``x = (f - mean) / (2 std)`` (AST's and PSLA's convention), so
  ``x_t = x_s · std_s / std_t + (mean_s - mean_t) / (2 std_t)``; masked and padded frames
  (``f = 0``) map to the teacher's own pad value;
- length: AST's/PSLA's dataloaders zero-pad or keep the first frames. Keeping the first
  ``T_t`` of the student's ``T_s >= T_t`` frames is exact; padding to ``T_t > T_s`` is exact
  only for clips that fit in ``T_s`` frames (``teacher.pad_input: true`` states that);
- other mel bins cannot be adapted.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cmkd_scale.config import ConfigError, DataConfig, ModelConfig, TeacherConfig

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RANDOM_PREFIX = "random:"


def teacher_dtype(cfg: TeacherConfig, device: torch.device) -> torch.dtype:
    """``teacher.dtype`` with ``auto`` decided: bf16 on GPU, fp32 on CPU."""
    if cfg.dtype != "auto":
        return _DTYPES[cfg.dtype]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


INPUT_KEYS = ("num_mel_bins", "target_length", "norm_mean", "norm_std")


@dataclass(frozen=True)
class InputSettings:
    """What a model's input is: ``num_mel_bins`` x ``target_length`` of (f - mean) / (2 std)."""

    num_mel_bins: int
    target_length: int
    norm_mean: float
    norm_std: float

    @classmethod
    def of(cls, data: DataConfig | Mapping[str, Any]) -> InputSettings:
        get = data.get if isinstance(data, Mapping) else lambda k: getattr(data, k)
        return cls(
            num_mel_bins=int(get("num_mel_bins")),
            target_length=int(get("target_length")),
            norm_mean=float(get("norm_mean")),
            norm_std=float(get("norm_std")),
        )

    def describe(self) -> str:
        return (
            f"{self.num_mel_bins} mel bins, {self.target_length} frames, mean {self.norm_mean:g}, "
            f"std {self.norm_std:g}"
        )


class TeacherInputError(ConfigError):
    """The student's input cannot be turned exactly into the teacher's."""


class InputAdapter(nn.Module):
    """The student's normalised batch -> the teacher's own input (exact, or refused)."""

    def __init__(
        self, student: InputSettings, teacher: InputSettings, *, pad_input: bool = False
    ) -> None:
        super().__init__()
        both = f"student (data.*): {student.describe()}; teacher: {teacher.describe()}"
        if student.num_mel_bins != teacher.num_mel_bins:
            raise TeacherInputError(
                f"the teacher's input cannot be made from the student's: {both}. Other mel "
                "bins are other features: train the student on the teacher's num_mel_bins, or "
                "use a teacher trained on the student's"
            )
        if teacher.target_length > student.target_length and not pad_input:
            raise TeacherInputError(
                f"the teacher takes more frames than the student gets: {both}. Padding the "
                "student's input equals the teacher's own input only for clips of at most "
                f"{student.target_length} frames; if every clip is that short, set "
                "teacher.pad_input=true, else raise data.target_length to "
                f"{teacher.target_length}"
            )
        self.student, self.teacher = student, teacher
        self.scale = student.norm_std / teacher.norm_std
        self.shift = (student.norm_mean - teacher.norm_mean) / (2.0 * teacher.norm_std)
        self.pad_value = -teacher.norm_mean / (2.0 * teacher.norm_std)  # f = 0, normalised
        self.identity = student == teacher

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return x
        x = x.float()
        if self.scale != 1.0 or self.shift != 0.0:
            x = x * self.scale + self.shift
        frames, want = x.shape[1], self.teacher.target_length
        if frames > want:
            x = x[:, :want]
        elif frames < want:
            x = F.pad(x, (0, 0, 0, want - frames), value=self.pad_value)
        return x


class FrozenTeacher(nn.Module):
    """Wraps a trained model so that nothing can train it by accident."""

    def __init__(
        self, model: nn.Module, *, dtype: torch.dtype, adapter: InputAdapter | None = None
    ) -> None:
        super().__init__()
        self.model = model.to(dtype=dtype)
        self.adapter = adapter
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
        if self.adapter is not None:
            fbank = self.adapter(fbank)  # the teacher's own input settings (fp32 arithmetic)
        logits = self.model(fbank.to(self.dtype)).float()
        if fbank.device.type == "cuda":
            torch.cuda.synchronize(fbank.device)
        self.last_ms = (time.perf_counter() - start) * 1000.0
        # inference tensors cannot enter autograd; a plain clone can (as a constant)
        return logits.clone()


def teacher_input(
    cfg: TeacherConfig, student: InputSettings, exported: Mapping[str, Any] | None, source: str
) -> InputSettings:
    """The teacher's input settings: its export's data.*, else teacher.*, else the student's."""
    declared = {k: getattr(cfg, k) for k in INPUT_KEYS if getattr(cfg, k) not in (0, None)}
    if exported is not None:
        own = InputSettings.of(exported)
        for key, value in declared.items():
            if value != getattr(own, key):
                raise ConfigError(
                    f"config key 'teacher.{key}': {value} differs from the teacher export's "
                    f"data.{key} = {getattr(own, key)} ({source}); an export states its own "
                    "input settings: drop the key"
                )
        return own
    settings = dataclasses.replace(student, **declared)
    unstated = [k for k in INPUT_KEYS if k not in declared]
    if source and unstated:
        log.warning(
            "teacher %s carries no input settings: %s taken from the student's data.*; a "
            "released model needs its own (teacher.norm_mean/norm_std/target_length/"
            "num_mel_bins; PSLA's AudioSet models: -4.6476 / 4.5699 / 1056 / 128)",
            source,
            "/".join(unstated),
        )
    return settings


def build_teacher(
    cfg: TeacherConfig,
    *,
    num_classes: int,
    input_tdim: int,
    input_fdim: int,
    device: torch.device,
    student: DataConfig | None = None,
) -> FrozenTeacher | None:
    """The frozen teacher from ``cfg.teacher`` (None when ``arch: none``).

    ``student``: the student's data settings (default: ``input_tdim`` x ``input_fdim`` with the
    default normalisation); the teacher is built for its own input and fed through an
    :class:`InputAdapter`.
    """
    if cfg.arch == "none":
        return None
    from cmkd_scale.models import build_model
    from cmkd_scale.models.exported import Export
    from cmkd_scale.models.load import load_checkpoint_object, read_checkpoint

    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelConfig)}
    fields["name"] = cfg.name.removeprefix(RANDOM_PREFIX)
    fields["imagenet_weights"] = ""  # a teacher's weights all come from its checkpoint
    if student is None:
        student = DataConfig(target_length=input_tdim, num_mel_bins=input_fdim)
    student_in = InputSettings.of(student)
    from cmkd_scale.models.hf_ast import hf_export, is_hf_ast

    if cfg.checkpoint and is_hf_ast(cfg.checkpoint):
        # a transformers AST (folder or hf:<id>): an export with its own input settings
        raw = hf_export(cfg.checkpoint).payload()
    else:
        raw = read_checkpoint(cfg.checkpoint) if cfg.checkpoint else None
    exported_data = None
    if Export.looks_like(raw):
        # Our export carries its architecture and its input settings: the teacher is built
        # exactly as it was trained, for the input it was trained on.
        export_cfg = Export.from_payload(raw, source=cfg.checkpoint).config
        exported = export_cfg.get("model", {})
        exported_data = export_cfg.get("data", {})
        keep = ("checkpoint", "imagenet_weights")
        fields.update({k: v for k, v in exported.items() if k in fields and k not in keep})
        log.info("teacher architecture from its export: %s %s", fields["arch"], fields["name"])
    own = teacher_input(cfg, student_in, exported_data, cfg.checkpoint)
    adapter = InputAdapter(student_in, own, pad_input=cfg.pad_input)
    if not adapter.identity:
        log.info(
            "teacher input adapted exactly: student %s -> teacher %s",
            student_in.describe(),
            own.describe(),
        )
    model_cfg = ModelConfig(**fields)
    model = build_model(
        model_cfg,
        num_classes=num_classes,
        input_tdim=own.target_length,
        input_fdim=own.num_mel_bins,
    )
    if raw is not None:
        load_checkpoint_object(model, raw, source=cfg.checkpoint, strict=True)
        log.info("teacher %s loaded from %s", model_cfg.name, cfg.checkpoint)
    else:
        log.warning("teacher %s has RANDOM weights (tests only: %s)", cfg.name, RANDOM_PREFIX)
    dtype = teacher_dtype(cfg, device)
    teacher = FrozenTeacher(model.to(device), dtype=dtype, adapter=adapter)
    n_params = sum(p.numel() for p in teacher.parameters())
    log.info("teacher %s: %.2f M params, %s, frozen", cfg.name, n_params / 1e6, dtype)
    return teacher

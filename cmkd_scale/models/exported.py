"""Exported students: the one file format that evaluate, infer, export and the teacher read.

An export is a ``torch.save``d dict: ``format`` ("cmkd_scale.student/1"), ``model`` (fp32
state dict), ``config`` (the resolved training config), ``num_classes``, ``class_names`` and
``source_checkpoint``. The trainer writes ``models/epoch-NNN.pt``, ``best.pt`` and ``final.pt``;
``Export`` saves, loads (checking the format tag) and builds the model of one.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cmkd_scale.config import Config, ModelConfig, from_dict

EXPORT_FORMAT = "cmkd_scale.student/1"


class ExportError(ValueError):
    """A file that is not a cmkd_scale export, or one of another format version."""


@dataclass(kw_only=True)
class Export:
    """One exported student: weights, the config it was trained with, its classes."""

    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]  # Config.to_dict() of the training run
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    source_checkpoint: str | list[str] = ""  # the checkpoint tag (or the averaged files)

    @staticmethod
    def looks_like(obj: Any) -> bool:
        """True for a dict shaped like an export (``model`` and ``config`` keys)."""
        return isinstance(obj, Mapping) and "model" in obj and "config" in obj

    @classmethod
    def from_payload(cls, payload: Any, *, source: str | Path) -> Export:
        """The export in a loaded file; raises ``ExportError`` naming ``source`` otherwise."""
        if not cls.looks_like(payload):
            raise ExportError(
                f"{source} is not a cmkd_scale export (expected keys model/config/num_classes); "
                "export one with the trainer (models/*.pt in the run dir)"
            )
        if payload.get("format") != EXPORT_FORMAT:
            raise ExportError(
                f"{source} has export format {payload.get('format')!r}; this version reads "
                f"{EXPORT_FORMAT!r}: re-export it with this version's trainer or evaluate --wa"
            )
        state = dict(payload["model"])
        names = list(payload.get("class_names") or [])
        return cls(
            state_dict=state,
            config=dict(payload["config"]),
            num_classes=int(payload.get("num_classes") or len(names)),
            class_names=names,
            source_checkpoint=payload.get("source_checkpoint", ""),
        )

    @classmethod
    def load(cls, path: str | Path) -> Export:
        """Read and check an export file (weights-only torch load, onto the CPU)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"exported checkpoint {path} does not exist")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
            from cmkd_scale.models.load import refusal

            raise ExportError(refusal(path, exc)) from exc
        return cls.from_payload(payload, source=path)

    def payload(self) -> dict[str, Any]:
        """The dict that is saved (with the format tag)."""
        return {
            "format": EXPORT_FORMAT,
            "model": self.state_dict,
            "config": self.config,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "source_checkpoint": self.source_checkpoint,
        }

    def save(self, path: str | Path) -> Path:
        """Write atomically (a crash leaves the previous file or none)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(self.payload(), path)
        return path

    @property
    def cfg(self) -> Config:
        """The training run's resolved config."""
        return from_dict(self.config)

    def model_config(self) -> ModelConfig:
        """The student's architecture as trained."""
        return self.cfg.model

    def model(self, device: torch.device | str = "cpu") -> nn.Module:
        """The student network, weights loaded strictly, in eval mode."""
        from cmkd_scale.models import build_model

        cfg = self.cfg
        model = build_model(
            # every weight comes from the export: no ImageNet download for the start it had
            dataclasses.replace(cfg.model, imagenet_weights=""),
            num_classes=self.num_classes,
            input_tdim=cfg.data.target_length,
            input_fdim=cfg.data.num_mel_bins,
        )
        model.load_state_dict(self.state_dict, strict=True)
        return model.to(device).eval()


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` under a temporary name, then rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def epoch_tag(epoch: int) -> str:
    """The checkpoint tag of an epoch end, also its export's name (``models/epoch-003.pt``)."""
    return f"epoch-{epoch:03d}"


def copy_export(src: Path, dest: Path) -> None:
    """Atomically copy an export (e.g. an epoch's student to ``best.pt``)."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def load_export(path: str | Path) -> dict[str, Any]:
    """``Export.load(path).payload()``: the checked export as a dict."""
    return Export.load(path).payload()


def build_student(payload: dict[str, Any], device: torch.device) -> nn.Module:
    """``Export.from_payload(payload).model(device)``."""
    return Export.from_payload(payload, source="export").model(device)

"""Exported students: the one file format that evaluate, infer, export and the teacher read.

An export is a ``torch.save``d dict: ``format`` ("cmkd_scale.student/1"), ``model`` (fp32
state dict), ``config`` (the resolved training config), ``num_classes``, ``class_names`` and
``source_checkpoint``. The trainer writes ``models/epoch-NNN.pt``, ``best.pt`` and ``final.pt``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from cmkd_scale.config import from_dict

EXPORT_FORMAT = "cmkd_scale.student/1"


def atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def epoch_tag(epoch: int) -> str:
    return f"epoch-{epoch:03d}"


def copy_export(src: Path, dest: Path) -> None:
    """Atomically copy an export (e.g. an epoch's student to ``best.pt``)."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def load_export(path: str | Path) -> dict[str, Any]:
    """Read an exported student; raises with the file name when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported checkpoint {path} does not exist")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or "model" not in payload or "config" not in payload:
        raise ValueError(
            f"{path} is not a cmkd_scale export (expected keys model/config/num_classes); "
            "export one with the trainer (models/*.pt in the run dir)"
        )
    return payload


def build_student(payload: dict[str, Any], device: torch.device) -> torch.nn.Module:
    """The student network of an export, weights loaded strictly, in eval mode."""
    from cmkd_scale.models import build_model

    cfg = from_dict(payload["config"])
    model = build_model(
        cfg.model,
        num_classes=payload["num_classes"],
        input_tdim=cfg.data.target_length,
        input_fdim=cfg.data.num_mel_bins,
    )
    model.load_state_dict(payload["model"], strict=True)
    return model.to(device).eval()

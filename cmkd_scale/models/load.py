"""Load released AST / PSLA / CMKD checkpoints and our exports into our models.

Layouts, detected from the keys after stripping ``module.`` prefixes (DataParallel/DeepSpeed):

- ``export``: ours, ``{"model": state_dict, "config": resolved config, ...}``.
- ``ast``: AST and CMKD transformer checkpoints (``v.*``, ``mlp_head.*``).  Our AST uses the same
  names; the unused timm heads ``v.head`` / ``v.head_dist`` are dropped.  A positional embedding
  for another number of time patches (e.g. the 1024-frame AudioSet model fine-tuned on 5 s
  ESC-50 clips) is cut or interpolated as AST does.
- ``psla``: PSLA and CMKD CNN checkpoints (``effnet._conv_stem``, ``effnet._blocks.N.*``,
  ``attention.*``; efficientnet_pytorch names), renamed to timm's EfficientNet names.
- ``native``: a bare state dict of one of our models (e.g. consolidated from DeepSpeed).

A key that maps to nothing in the model is always an error naming the keys and the layout.
With ``strict=True`` missing keys and shape mismatches are errors too; with ``strict=False``
(fine-tuning: new label set) they are skipped and logged.
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import fsspec
import torch
from torch import nn

from cmkd_scale.models.ast import ASTModel, adapt_pos_embed

log = logging.getLogger(__name__)

_SHOW = 8  # keys named in an error message


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model."""


def refusal(path: str | Path, exc: BaseException) -> str:
    """Why a weights-only ``torch.load`` of ``path`` failed, in words.

    Files that may come from someone else (exports, teachers, released checkpoints, evaluate /
    infer / export inputs) are read with ``weights_only=True``: tensors and plain values only.
    A pickle that names a callable (``__reduce__``: code that would run on load) is refused.
    """
    text = str(exc)
    named = re.search(r"GLOBAL ([\w.]+)", text)
    if isinstance(exc, pickle.UnpicklingError) or named:
        what = f"it names {named.group(1)!r}, which" if named else "it holds an object that"
        return (
            f"checkpoint {path} was refused: {what} torch.load would call; files from outside "
            "a run are read weights-only (tensors and plain values). Re-save it as a plain "
            "state dict: torch.save(model.state_dict(), path)"
        )
    first = (text.strip().splitlines() or [type(exc).__name__])[0]
    return (
        f"checkpoint {path} is not a readable torch file ({first}): truncated, or not a "
        "checkpoint; re-download or re-export it"
    )


def read_checkpoint(path: str) -> Any:
    """``torch.load`` a local or fsspec path with ``weights_only=True`` onto the CPU."""
    try:
        with fsspec.open(path, "rb") as handle:
            return torch.load(handle, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint {path} does not exist") from exc
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(refusal(path, exc)) from exc


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def unwrap(obj: Any, path: str) -> tuple[dict[str, torch.Tensor], str | None]:
    """The state dict inside a checkpoint, and ``"export"`` when it is one of ours."""
    if (
        isinstance(obj, Mapping)
        and "model" in obj
        and "config" in obj
        and _is_state_dict(obj["model"])
    ):
        return dict(obj["model"]), "export"
    if _is_state_dict(obj):
        return dict(obj), None
    if isinstance(obj, Mapping):
        for key in ("state_dict", "module", "model"):
            if _is_state_dict(obj.get(key)):
                return dict(obj[key]), None
    top = list(obj)[:_SHOW] if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointError(
        f"checkpoint {path} holds no state dict (top level: {top}); expected a state dict, "
        "{'model': state_dict, 'config': ...} (our export) or {'state_dict': ...}"
    )


def strip_module_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DataParallel/DeepSpeed ``module.`` prefixes."""
    out = {}
    for key, value in state.items():
        while key.startswith("module."):
            key = key[len("module.") :]
        out[key] = value
    return out


def detect_layout(keys: list[str]) -> str:
    """``ast``, ``psla`` or ``native`` from the state-dict keys."""
    if any(k.startswith(("v.", "mlp_head.")) for k in keys):
        return "ast"
    if any(k.startswith("effnet._") for k in keys):
        return "psla"
    return "native"


# efficientnet_pytorch block member -> timm member, per timm block type
_DS_BLOCK = {  # expand ratio 1 (timm DepthwiseSeparableConv)
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_IR_BLOCK = {  # timm InvertedResidual
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}


def _psla_key_map(model: nn.Module) -> dict[str, str] | None:
    """efficientnet_pytorch member prefix -> timm prefix for ``model.effnet``'s blocks."""
    effnet = getattr(model, "effnet", None)
    blocks = getattr(effnet, "blocks", None)
    if blocks is None:
        return None
    mapping = {f"effnet.{old}": f"effnet.{new}" for old, new in _TOP.items()}
    flat = 0
    for stage_index, stage in enumerate(blocks):
        for block_index, block in enumerate(stage):
            members = _IR_BLOCK if hasattr(block, "conv_pwl") else _DS_BLOCK
            for old, new in members.items():
                mapping[f"effnet._blocks.{flat}.{old}"] = (
                    f"effnet.blocks.{stage_index}.{block_index}.{new}"
                )
            flat += 1
    return mapping


def _rename_psla(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    mapping = _psla_key_map(model)
    if mapping is None:
        return state  # not our CNN: every effnet._ key is then reported as unmapped
    out = {}
    for key, value in state.items():
        new_key = key
        if key.startswith("effnet._"):
            prefix, _, leaf = key.rpartition(".")
            if prefix in mapping:
                new_key = f"{mapping[prefix]}.{leaf}"
        out[new_key] = value
    return out


def map_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], layout: str
) -> dict[str, torch.Tensor]:
    """Rename a checkpoint's keys to the model's names (layout-specific)."""
    own = model.state_dict()
    if layout == "ast":
        dropped = [k for k in state if k.startswith(("v.head.", "v.head_dist.")) and k not in own]
        if dropped:
            log.info("AST checkpoint: dropping the unused timm heads %s", dropped)
        return {k: v for k, v in state.items() if k not in dropped}
    if layout == "psla":
        return _rename_psla(model, state)
    return state


def _fit_shape(
    model: nn.Module, key: str, value: torch.Tensor, target: torch.Tensor
) -> torch.Tensor | None:
    """A resized copy of ``value`` where the difference has a known meaning, else None."""
    if key == "v.pos_embed" and isinstance(model, ASTModel) and value.shape[-1] == target.shape[-1]:
        prefix = model.prefix_tokens
        f_dim, t_dim = model.grid
        patches = value.shape[1] - prefix
        if patches > 0 and patches % f_dim == 0:
            old_grid = (f_dim, patches // f_dim)
            log.warning(
                "v.pos_embed: checkpoint grid %dx%d adapted to %dx%d (AST's cut/interpolate)",
                *old_grid,
                f_dim,
                t_dim,
            )
            return adapt_pos_embed(value, prefix, old_grid, (f_dim, t_dim))
    if value.dim() == 2 and target.dim() == 4 and target.shape == (*value.shape, 1, 1):
        return value.reshape(target.shape)  # a Linear classifier into a 1x1 conv
    return None


def load_pretrained(model: nn.Module, path: str, *, strict: bool = True) -> None:
    """Load AST / PSLA / CMKD / our exported weights from ``path`` into ``model``."""
    load_checkpoint_object(model, read_checkpoint(path), source=path, strict=strict)


def load_checkpoint_object(model: nn.Module, raw: Any, *, source: str, strict: bool = True) -> None:
    """:func:`load_pretrained` on a checkpoint already read (``source`` names it in errors)."""
    path = source
    state, wrapper = unwrap(raw, path)
    state = strip_module_prefix(state)
    layout = wrapper or detect_layout(list(state))
    mapped = map_state_dict(model, state, layout)
    own = model.state_dict()
    name = getattr(model, "arch_name", type(model).__name__)

    unmapped = [k for k in mapped if k not in own]
    if unmapped:
        raise CheckpointError(
            f"checkpoint {path} (layout '{layout}') has {len(unmapped)} key(s) that map to "
            f"nothing in model {name}: {unmapped[:_SHOW]}; check model.arch/model.name "
            f"(e.g. {own and next(iter(own))!r} is one of the model's keys)"
        )

    loadable: dict[str, torch.Tensor] = {}
    mismatched: list[str] = []
    for key, value in mapped.items():
        target = own[key]
        if value.shape != target.shape:
            value = _fit_shape(model, key, value, target)
            if value is None:
                mismatched.append(
                    f"{key}: checkpoint {tuple(mapped[key].shape)} vs model {tuple(target.shape)}"
                )
                continue
        loadable[key] = value
    missing = [k for k in own if k not in mapped]
    if strict and (mismatched or missing):
        parts = []
        if mismatched:
            parts.append(f"shape mismatches {mismatched[:_SHOW]}")
        if missing:
            parts.append(f"missing keys {missing[:_SHOW]}")
        raise CheckpointError(
            f"checkpoint {path} (layout '{layout}') does not fit model {name}: "
            + "; ".join(parts)
            + ". A different label set or input size? Build the model to match, or load with "
            "strict=False to fine-tune from it (mismatched and missing weights stay new)"
        )
    if mismatched:
        log.warning("not loaded (shape differs, kept new): %s", mismatched)
    if missing:
        log.warning("not in checkpoint (kept new): %s", missing[:_SHOW])
    model.load_state_dict(loadable, strict=False)
    log.info(
        "loaded %d tensors from %s (layout %s) into %s",
        len(loadable),
        Path(path).name,
        layout,
        name,
    )

"""Audio classifiers: AST (transformer), PSLA EfficientNet (CNN), any timm image model.

Every model maps a normalised fbank ``[B, T, F]`` to logits ``[B, num_classes]`` and names
itself in ``model.arch_name`` (for tracking tags).  Weights are loaded separately with
:func:`load_pretrained` (AST / PSLA / CMKD / our exported layouts).
"""

from __future__ import annotations

from torch import nn

from cmkd_scale.config import ModelConfig
from cmkd_scale.models.ast import ASTModel
from cmkd_scale.models.cnn import EffNetAttention
from cmkd_scale.models.load import (
    CheckpointError,
    load_checkpoint_object,
    load_pretrained,
    read_checkpoint,
)
from cmkd_scale.models.timm_image import TimmClassifier

__all__ = [
    "ASTModel",
    "CheckpointError",
    "EffNetAttention",
    "TimmClassifier",
    "build_model",
    "load_checkpoint_object",
    "load_pretrained",
    "read_checkpoint",
]


def build_model(
    cfg: ModelConfig, *, num_classes: int, input_tdim: int, input_fdim: int = 128
) -> nn.Module:
    """Build the classifier ``cfg`` describes (random or ImageNet-initialised, no checkpoint)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if cfg.arch == "ast":
        return ASTModel(
            name=cfg.name,
            num_classes=num_classes,
            input_tdim=input_tdim,
            input_fdim=input_fdim,
            fstride=cfg.fstride,
            tstride=cfg.tstride,
            imagenet_weights=cfg.imagenet_weights,
            drop_path=cfg.drop_path,
            embed_dim=cfg.embed_dim,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            layer_norm_eps=cfg.layer_norm_eps,
        )
    if cfg.arch == "efficientnet":
        return EffNetAttention(
            name=cfg.name,
            num_classes=num_classes,
            pooling=cfg.pooling,
            heads=cfg.attention_heads,
            cla_activation=cfg.cla_activation,
            drop_path=cfg.drop_path,
            imagenet_weights=cfg.imagenet_weights,
        )
    if cfg.arch == "timm":
        return TimmClassifier(
            name=cfg.name,
            num_classes=num_classes,
            input_tdim=input_tdim,
            input_fdim=input_fdim,
            imagenet_weights=cfg.imagenet_weights,
            drop_path=cfg.drop_path,
        )
    raise ValueError(f"model.arch={cfg.arch!r} builds no model: use ast, efficientnet or timm")

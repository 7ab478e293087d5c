"""AST: the Audio Spectrogram Transformer on a timm ViT/DeiT.

Follows AST ``src/models/ast_models.py`` (ASTModel) with timm 1.x:

- Input ``[B, T, F]`` becomes ``[B, 1, F, T]``; 16x16 patches at stride ``fstride`` x
  ``tstride`` (10 = overlap 6) give an ``f_dim x t_dim`` grid,
  ``f_dim = (F - 16) // fstride + 1``.
- Tokens: CLS (+ distillation token for DeiT-distilled backbones), positional embedding,
  the backbone's blocks and final norm; the output is the mean of the CLS and distillation
  token outputs (CLS alone for a plain ViT), then ``mlp_head`` = LayerNorm + Linear.
- From ImageNet weights (``timm:deit_base_distilled_patch16_384.fb_in1k`` or a local timm
  state dict; models/pretrained.py): the patch projection's RGB kernels are
  summed to one channel; the positional embedding grid is cut from the middle or bilinearly
  interpolated to ``f_dim x t_dim`` (AST's rule, per axis).  Without them the positional
  embedding is random (trunc normal, std 0.02).
- State-dict names match AST's (``v.patch_embed.proj``, ``v.pos_embed``, ``v.cls_token``,
  ``v.dist_token``, ``v.blocks.*``, ``v.norm``, ``mlp_head.0/1``), so released AST and CMKD
  checkpoints load after stripping ``module.``.  The timm classifier heads ``v.head`` and
  ``v.head_dist`` that AST carries but never uses are not kept here (the loader drops them).
- Tiny variants for tests: ``embed_dim``/``depth``/``num_heads`` override the backbone's.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from cmkd_scale.models.pretrained import create_timm

log = logging.getLogger(__name__)

PATCH = 16


class PatchEmbed(nn.Module):
    """Overlapping 16x16 patches of a one-channel spectrogram -> [B, N, D] tokens."""

    def __init__(self, embed_dim: int, fstride: int, tstride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(1, embed_dim, kernel_size=PATCH, stride=(fstride, tstride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def patch_grid(input_fdim: int, input_tdim: int, fstride: int, tstride: int) -> tuple[int, int]:
    """Number of patches along frequency and time."""
    if input_fdim < PATCH or input_tdim < PATCH:
        raise ValueError(
            f"AST needs at least {PATCH} frequency bins and frames, got "
            f"{input_fdim}x{input_tdim}: raise data.num_mel_bins / data.target_length"
        )
    return (input_fdim - PATCH) // fstride + 1, (input_tdim - PATCH) // tstride + 1


def _cut_or_interpolate(grid: torch.Tensor, size: int, axis: int) -> torch.Tensor:
    """AST's rule along one axis of [1, D, H, W]: take the middle ``size`` or interpolate."""
    current = grid.shape[axis]
    if size <= current:
        start = current // 2 - size // 2
        return grid.narrow(axis, start, size)
    target = list(grid.shape[2:])
    target[axis - 2] = size
    return F.interpolate(grid, size=tuple(target), mode="bilinear")


def adapt_pos_embed(
    pos_embed: torch.Tensor, prefix: int, old_grid: tuple[int, int], new_grid: tuple[int, int]
) -> torch.Tensor:
    """Resize a [1, prefix + H*W, D] positional embedding to a new patch grid as AST does."""
    dim = pos_embed.shape[-1]
    grid = pos_embed[:, prefix:, :].reshape(1, old_grid[0], old_grid[1], dim)
    grid = grid.permute(0, 3, 1, 2)  # [1, D, H, W]
    grid = _cut_or_interpolate(grid, new_grid[1], axis=3)  # time first, as AST
    grid = _cut_or_interpolate(grid, new_grid[0], axis=2)
    grid = grid.reshape(1, dim, new_grid[0] * new_grid[1]).transpose(1, 2)
    return torch.cat([pos_embed[:, :prefix, :], grid], dim=1)


class ASTModel(nn.Module):
    """AST on a timm ViT/DeiT backbone; forward [B, T, F] -> logits [B, C]."""

    def __init__(
        self,
        *,
        name: str,
        num_classes: int,
        input_tdim: int,
        input_fdim: int = 128,
        fstride: int = 10,
        tstride: int = 10,
        imagenet_weights: str = "",
        drop_path: float = 0.0,
        embed_dim: int = 0,
        depth: int = 0,
        num_heads: int = 0,
        layer_norm_eps: float = 0.0,
    ) -> None:
        super().__init__()
        overrides = {
            key: value
            for key, value in (("embed_dim", embed_dim), ("depth", depth), ("num_heads", num_heads))
            if value
        }
        if imagenet_weights:
            log.info("AST: ImageNet weights %s", imagenet_weights)
        self.v = create_timm(name, imagenet_weights, drop_path_rate=drop_path, **overrides)
        if not hasattr(self.v, "cls_token") or not hasattr(self.v, "pos_embed"):
            raise ValueError(
                f"model.name={name!r} is not a timm ViT/DeiT (no cls_token/pos_embed): AST needs "
                "e.g. deit_base_distilled_patch16_384 or vit_base_patch16_384"
            )
        self.prefix_tokens = 2 if getattr(self.v, "dist_token", None) is not None else 1
        dim = self.v.pos_embed.shape[-1]
        old_grid = tuple(self.v.patch_embed.grid_size)
        self.grid = patch_grid(input_fdim, input_tdim, fstride, tstride)

        new_embed = PatchEmbed(dim, fstride, tstride)
        if imagenet_weights:
            with torch.no_grad():
                old = self.v.patch_embed.proj
                new_embed.proj.weight.copy_(old.weight.sum(dim=1, keepdim=True))
                new_embed.proj.bias.copy_(old.bias)
                pos = adapt_pos_embed(self.v.pos_embed, self.prefix_tokens, old_grid, self.grid)
        else:
            pos = torch.zeros(1, self.prefix_tokens + self.grid[0] * self.grid[1], dim)
            trunc_normal_(pos, std=0.02)
        self.v.patch_embed = new_embed
        self.v.pos_embed = nn.Parameter(pos.detach().clone())
        self.v.head = nn.Identity()
        if hasattr(self.v, "head_dist"):
            self.v.head_dist = nn.Identity()
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))
        if layer_norm_eps:  # e.g. a Hugging Face AST checkpoint's (1e-12)
            for module in self.modules():
                if isinstance(module, nn.LayerNorm):
                    module.eps = layer_norm_eps
        self.arch_name = f"ast-{name}-f{fstride}t{tstride}"
        if overrides:
            self.arch_name += "-" + "-".join(f"{k}{v}" for k, v in overrides.items())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(1).transpose(2, 3)  # [B, 1, F, T]
        batch = x.shape[0]
        x = self.v.patch_embed(x)
        tokens = [self.v.cls_token.expand(batch, -1, -1)]
        if self.prefix_tokens == 2:
            tokens.append(self.v.dist_token.expand(batch, -1, -1))
        x = torch.cat([*tokens, x], dim=1) + self.v.pos_embed
        x = self.v.pos_drop(x)
        for block in self.v.blocks:
            x = block(x)
        x = self.v.norm(x)
        pooled = (x[:, 0] + x[:, 1]) / 2 if self.prefix_tokens == 2 else x[:, 0]
        return self.mlp_head(pooled)

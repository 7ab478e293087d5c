"""PSLA's CNN: EfficientNet (timm) with attention or mean pooling over time.

Layer structure follows PSLA ``src/models/Models.py`` (EffNetAttention) and
``src/models/HigherModels.py`` (MHeadAttention, Attention, MeanPooling); CMKD reuses them.

- Input ``[B, T, F]`` becomes ``[B, 1, F, T]`` (frequency as height, time as width).
- Backbone: timm ``tf_efficientnet_bN`` (``efficientnet_bN`` names the same network), one
  input channel.  PSLA builds its EfficientNet with ``efficientnet_pytorch``, whose strided
  convolutions use TF "same" padding computed once for the ImageNet resolution (224/240/260
  for B0/B1/B2) and then applied to any input.  For B1/B2 this differs from timm's dynamic
  "same" padding on 128-bin spectrograms, so the strided convs are swapped for
  :class:`StaticSamePadConv2d` with PSLA's pads; a PSLA checkpoint then gives PSLA's outputs.
- ImageNet weights (``model.imagenet_weights``: ``timm:tf_efficientnet_bN.aa_in1k`` = the
  efficientnet_pytorch weights PSLA loads, or a local file; models/pretrained.py): timm
  adapts the stem to one channel by summing the RGB kernels (as AST does for its patch
  embedding).  PSLA instead re-initialises the stem (``efficientnet_pytorch``'s
  ``_change_in_channels``); we keep the pretrained kernels.
- Features are averaged over frequency (PSLA: ``AvgPool2d((4, 1))`` on the 4 remaining bins)
  and pooled over time by ``attention`` (per-head 1x1 conv attention and classification maps,
  normalised attention over time, learnable head weights) or ``mean``.
- BatchNorm as efficientnet_pytorch: eps 1e-3 (timm's tf_ default) and momentum 0.01 in
  PyTorch's convention (running = (1 - m)·running + m·batch; efficientnet_pytorch's
  ``batch_norm_momentum=0.99`` is TF's decay, passed to PyTorch as ``1 - 0.99``); timm's own
  default would be 0.1.
- Output: logits.  With ``cla_activation="linear"`` (CMKD) the pooled values are logits.  PSLA's
  released models use ``sigmoid`` and output probabilities; those are turned back into logits
  (clamped to the dtype's epsilon) so every model here has the same contract.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cmkd_scale.models.pretrained import create_timm

log = logging.getLogger(__name__)

# efficientnet_pytorch's BatchNorm: PyTorch momentum 1 - batch_norm_momentum (0.99, TF decay).
PSLA_BN_MOMENTUM = 0.01

# efficientnet_pytorch's ImageNet resolution per variant (its static "same" padding uses it).
PSLA_RESOLUTION = {0: 224, 1: 240, 2: 260, 3: 300, 4: 380, 5: 456, 6: 528, 7: 600}

ClaActivation = Literal["linear", "sigmoid"]


def efficientnet_variant(name: str) -> int:
    """The N of ``efficientnet_bN`` / ``tf_efficientnet_bN``; raises for other names."""
    match = re.fullmatch(r"(?:tf_)?efficientnet_b(\d)", name)
    if not match or int(match.group(1)) not in PSLA_RESOLUTION:
        raise ValueError(
            f"model.name={name!r} is not an EfficientNet B0-B7: use efficientnet_b0..b7 "
            "(or tf_efficientnet_b0..b7) with model.arch=efficientnet, or model.arch=timm for "
            "other timm models"
        )
    return int(match.group(1))


class StaticSamePadConv2d(nn.Conv2d):
    """Conv2d with a fixed zero padding (left, right, top, bottom) applied before it."""

    def __init__(self, conv: nn.Conv2d, pad: tuple[int, int, int, int]) -> None:
        super().__init__(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=0,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
        )
        self.pad = pad
        with torch.no_grad():
            self.weight.copy_(conv.weight)
            if conv.bias is not None:
                self.bias.copy_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.pad))


def _same_pad(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def use_psla_padding(backbone: nn.Module, resolution: int) -> None:
    """Replace timm's dynamic-"same" strided convs with efficientnet_pytorch's static pads."""
    from timm.layers import Conv2dSame

    sizes: dict[str, tuple[int, int]] = {}
    hooks = []
    for name, module in backbone.named_modules():
        if isinstance(module, Conv2dSame):

            def record(mod: nn.Module, args: tuple, name: str = name) -> None:
                sizes[name] = tuple(args[0].shape[-2:])

            hooks.append(module.register_forward_pre_hook(record))
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        backbone.forward_features(torch.zeros(1, 1, resolution, resolution))
    backbone.train(was_training)
    for hook in hooks:
        hook.remove()
    for name, (height, width) in sizes.items():
        parent_name, _, child = name.rpartition(".")
        parent = backbone.get_submodule(parent_name) if parent_name else backbone
        conv = getattr(parent, child)
        top, bottom = _same_pad(height, conv.kernel_size[0], conv.stride[0], conv.dilation[0])
        left, right = _same_pad(width, conv.kernel_size[1], conv.stride[1], conv.dilation[1])
        setattr(parent, child, StaticSamePadConv2d(conv, (left, right, top, bottom)))


def _activate(x: torch.Tensor, activation: str) -> torch.Tensor:
    return torch.sigmoid(x) if activation == "sigmoid" else x


def _attention_pool(att: torch.Tensor, cla: torch.Tensor) -> torch.Tensor:
    """Average ``cla`` over time weighted by ``att`` (sigmoid, clamped, normalised)."""
    eps = 1e-7  # PSLA's clamp; representable in bf16 (the upper bound rounds to 1 there)
    att = torch.clamp(att, eps, 1.0 - eps)
    norm_att = att / torch.sum(att, dim=2, keepdim=True)
    return torch.sum(norm_att * cla, dim=2)


def _conv1x1(n_in: int, n_out: int) -> nn.Conv2d:
    conv = nn.Conv2d(n_in, n_out, kernel_size=1, bias=True)
    # PSLA's init_layer: uniform(+-sqrt(6 / fan_in)), zero bias
    bound = math.sqrt(2.0 / n_in) * math.sqrt(3.0)
    nn.init.uniform_(conv.weight, -bound, bound)
    nn.init.zeros_(conv.bias)
    return conv


class MHeadAttention(nn.Module):
    """PSLA multi-head attention pooling (state dict: att.{i}, cla.{i}, head_weight)."""

    def __init__(self, n_in: int, n_out: int, heads: int, cla_activation: ClaActivation) -> None:
        super().__init__()
        self.cla_activation = cla_activation
        self.att = nn.ModuleList(_conv1x1(n_in, n_out) for _ in range(heads))
        self.cla = nn.ModuleList(_conv1x1(n_in, n_out) for _ in range(heads))
        self.head_weight = nn.Parameter(torch.full((heads,), 1.0 / heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: [B, C, T, 1] -> [B, classes]."""
        out = 0
        for i, (att_conv, cla_conv) in enumerate(zip(self.att, self.cla, strict=True)):
            att = torch.sigmoid(att_conv(x))[..., 0]
            cla = _activate(cla_conv(x), self.cla_activation)[..., 0]
            out = out + _attention_pool(att, cla) * self.head_weight[i]
        return out


class Attention(nn.Module):
    """PSLA single-head attention pooling (state dict: att, cla)."""

    def __init__(self, n_in: int, n_out: int, cla_activation: ClaActivation) -> None:
        super().__init__()
        self.cla_activation = cla_activation
        self.att = _conv1x1(n_in, n_out)
        self.cla = _conv1x1(n_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        att = torch.sigmoid(self.att(x))[..., 0]
        cla = _activate(self.cla(x), self.cla_activation)[..., 0]
        return _attention_pool(att, cla)


class MeanPooling(nn.Module):
    """PSLA mean pooling: 1x1 conv classifier averaged over time (state dict: cla)."""

    def __init__(self, n_in: int, n_out: int, cla_activation: ClaActivation) -> None:
        super().__init__()
        self.cla_activation = cla_activation
        self.cla = _conv1x1(n_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.mean(_activate(self.cla(x), self.cla_activation)[..., 0], dim=2)


class EffNetAttention(nn.Module):
    """EfficientNet-B{N} + PSLA attention/mean pooling; forward [B, T, F] -> logits [B, C]."""

    def __init__(
        self,
        *,
        name: str,
        num_classes: int,
        pooling: Literal["attention", "mean"] = "attention",
        heads: int = 4,
        cla_activation: ClaActivation = "linear",
        drop_path: float = 0.0,
        imagenet_weights: str = "",
    ) -> None:
        super().__init__()
        variant = efficientnet_variant(name)
        timm_name = f"tf_efficientnet_b{variant}"
        if imagenet_weights:
            log.info("EfficientNet-B%d: ImageNet weights %s", variant, imagenet_weights)
        self.effnet = create_timm(
            timm_name,
            imagenet_weights,
            in_chans=1,
            num_classes=0,
            global_pool="",
            drop_path_rate=drop_path,
        )
        use_psla_padding(self.effnet, PSLA_RESOLUTION[variant])
        for module in self.effnet.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = PSLA_BN_MOMENTUM
        n_in = self.effnet.num_features
        if pooling == "mean":
            self.attention: nn.Module = MeanPooling(n_in, num_classes, cla_activation)
        elif heads == 1:
            self.attention = Attention(n_in, num_classes, cla_activation)
        else:
            self.attention = MHeadAttention(n_in, num_classes, heads, cla_activation)
        self.outputs_probabilities = cla_activation == "sigmoid"
        self.arch_name = f"efficientnet_b{variant}-{pooling}" + (
            f"{heads}" if pooling == "attention" else ""
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(1).transpose(2, 3)  # [B, 1, F, T]
        x = self.effnet.forward_features(x)  # [B, C, F', T']
        x = x.mean(dim=2, keepdim=True).transpose(2, 3)  # [B, C, T', 1]
        out = self.attention(x)
        if self.outputs_probabilities:
            eps = torch.finfo(out.dtype).eps
            out = torch.logit(out.clamp(eps, 1.0 - eps))
        return out

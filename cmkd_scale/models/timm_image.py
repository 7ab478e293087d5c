"""Any timm image model as an audio classifier (``model.arch=timm``).

The spectrogram ``[B, T, F]`` is fed as a one-channel image ``[B, 1, F, T]`` (frequency as
height, time as width, like AST and PSLA); timm builds the model with ``in_chans=1`` and
``num_classes=C`` and its own global pooling.  Models with a fixed input size (ViTs) are built
for ``img_size=(F, T)`` when they accept it.  ImageNet weights: ``timm:<name>.<tag>`` or a
local file (models/pretrained.py); timm sums the RGB stem kernels to one channel.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from cmkd_scale.models.pretrained import create_timm

log = logging.getLogger(__name__)


class TimmClassifier(nn.Module):
    """A timm image model on [B, 1, F, T]; forward [B, T, F] -> logits [B, C]."""

    def __init__(
        self,
        *,
        name: str,
        num_classes: int,
        input_tdim: int,
        input_fdim: int = 128,
        imagenet_weights: str = "",
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        kwargs: dict = {"in_chans": 1, "num_classes": num_classes}
        if drop_path:
            kwargs["drop_path_rate"] = drop_path
        try:
            self.model = create_timm(
                name, imagenet_weights, img_size=(input_fdim, input_tdim), **kwargs
            )
        except TypeError:  # convolutional nets take any size and no img_size argument
            self.model = create_timm(name, imagenet_weights, **kwargs)
        self.arch_name = f"timm-{name}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.unsqueeze(1).transpose(2, 3))

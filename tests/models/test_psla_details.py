"""PSLA details: efficientnet_pytorch's BatchNorm, ImageNet weights named by timm tag."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import torch
from efficientnet_pytorch import EfficientNet
from torch import nn

from cmkd_scale.config import ModelConfig, load_config
from cmkd_scale.models import build_model, load_pretrained
from cmkd_scale.models.pretrained import WeightsMissingError, timm_spec
from tests.models.test_load import ReferenceEffNetAttention, randomize, save_data_parallel

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PAPER = sorted(p for p in CONFIGS.glob("*.yaml") if re.match(r"(audioset|fsd50k|esc50)_", p.stem))


def _bns(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_batchnorm_is_efficientnet_pytorch_s(tmp_path):
    """momentum 0.01 (PyTorch convention) and eps 1e-3, as EfficientNet.from_name builds it."""
    ref = EfficientNet.from_name("efficientnet-b0", in_channels=1)
    assert {(round(bn.momentum, 12), bn.eps) for bn in _bns(ref)} == {(0.01, 1e-3)}  # 1 - 0.99
    ours = build_model(
        ModelConfig(arch="efficientnet", name="efficientnet_b0"), num_classes=3, input_tdim=64
    )
    assert {(bn.momentum, bn.eps) for bn in _bns(ours)} == {(0.01, 1e-3)}
    # and the running statistics move alike in a training forward pass
    psla = ReferenceEffNetAttention(label_dim=3, b=0, cla_activation="linear")
    randomize(psla, seed=3)
    path = tmp_path / "psla.pth"
    save_data_parallel(psla, path)
    load_pretrained(ours, str(path))
    x = torch.randn(4, 64, 128)
    psla.train()
    ours.train()
    with torch.no_grad():
        psla(x)
        ours(x)
    torch.testing.assert_close(
        ours.effnet.bn1.running_mean, psla.effnet._bn0.running_mean, rtol=1e-4, atol=1e-6
    )
    torch.testing.assert_close(
        ours.effnet.bn1.running_var, psla.effnet._bn0.running_var, rtol=1e-4, atol=1e-6
    )


def test_timm_tags_resolve_through_timm():
    assert timm_spec("tf_efficientnet_b2", "timm:tf_efficientnet_b2.aa_in1k") == (
        "tf_efficientnet_b2.aa_in1k",
        {"pretrained": True},
    )
    assert timm_spec("tf_efficientnet_b2", "timm:aa_in1k")[0] == "tf_efficientnet_b2.aa_in1k"
    assert timm_spec("tf_efficientnet_b2", "") == ("tf_efficientnet_b2", {})
    with pytest.raises(ValueError, match=r"is for tf_efficientnet_b0, but the backbone is"):
        timm_spec("tf_efficientnet_b2", "timm:tf_efficientnet_b0.aa_in1k")
    with pytest.raises(WeightsMissingError, match=r"python -m cmkd_scale\.weights fetch"):
        timm_spec("tf_efficientnet_b2", "pretrained/tf_efficientnet_b2.pth")


def test_a_missing_local_file_names_the_fetch_command():
    cfg = ModelConfig(arch="efficientnet", name="efficientnet_b0", imagenet_weights="nope.pth")
    with pytest.raises(FileNotFoundError, match=r"cmkd_scale\.weights fetch --config"):
        build_model(cfg, num_classes=3, input_tdim=64)


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.name)
def test_every_recipe_names_its_imagenet_weights_by_timm_tag(path):
    cfg = load_config(path)
    expected = {
        "efficientnet": "timm:tf_efficientnet_b2.aa_in1k",  # efficientnet_pytorch's weights
        "ast": "timm:deit_base_distilled_patch16_384.fb_in1k",
    }
    assert cfg.model.imagenet_weights == expected[cfg.model.arch]
    tag = cfg.model.imagenet_weights.removeprefix("timm:")
    assert tag in timm.list_pretrained(tag.split(".")[0] + "*")
    if cfg.model.arch == "efficientnet":
        assert cfg.model.pooling == "mean"  # CMKD Sec. 2.1 (the README says so)
        assert "fp32" in path.read_text().split("precision:")[1].splitlines()[0]

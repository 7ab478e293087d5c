"""build_model: shapes, names, ImageNet initialisation from a local file, bf16, errors."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from cmkd_scale.config import ModelConfig
from cmkd_scale.models import build_model

TINY_AST = ModelConfig(
    arch="ast", name="deit_tiny_distilled_patch16_224", embed_dim=64, depth=2, num_heads=2
)
CNN = ModelConfig(arch="efficientnet", name="efficientnet_b0", pooling="attention")


@pytest.mark.parametrize(
    ("cfg", "arch_name"),
    [
        (TINY_AST, "ast-deit_tiny_distilled_patch16_224-f10t10-embed_dim64-depth2-num_heads2"),
        (CNN, "efficientnet_b0-attention4"),
        (
            ModelConfig(arch="efficientnet", name="efficientnet_b0", pooling="mean"),
            "efficientnet_b0-mean",
        ),
        (
            ModelConfig(arch="efficientnet", name="tf_efficientnet_b0", attention_heads=1),
            "efficientnet_b0-attention1",
        ),
        (ModelConfig(arch="timm", name="resnet10t"), "timm-resnet10t"),
        (
            ModelConfig(arch="timm", name="vit_tiny_patch16_224", depth=0),
            "timm-vit_tiny_patch16_224",
        ),
    ],
)
def test_logits_shape_and_name(cfg, arch_name):
    model = build_model(cfg, num_classes=5, input_tdim=64).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 64, 128))
    assert out.shape == (2, 5)
    assert torch.isfinite(out).all()
    assert model.arch_name == arch_name


def test_ast_patch_grid_follows_strides():
    cfg = ModelConfig(**{**TINY_AST.__dict__, "fstride": 16, "tstride": 8})
    model = build_model(cfg, num_classes=3, input_tdim=100)
    # f: (128 - 16) // 16 + 1 = 8, t: (100 - 16) // 8 + 1 = 11; + cls + dist tokens
    assert model.v.pos_embed.shape[1] == 8 * 11 + 2


def test_ast_from_imagenet_weights(tmp_path):
    name = "deit_tiny_distilled_patch16_224"
    imagenet = timm.create_model(name, embed_dim=64, depth=2, num_heads=2)
    path = tmp_path / "deit_tiny.pth"
    torch.save(imagenet.state_dict(), path)
    cfg = ModelConfig(**{**TINY_AST.__dict__, "imagenet_weights": str(path)})
    model = build_model(cfg, num_classes=3, input_tdim=300)  # 12 x 29 patches vs 14 x 14
    torch.testing.assert_close(
        model.v.patch_embed.proj.weight,
        imagenet.patch_embed.proj.weight.sum(dim=1, keepdim=True),
    )
    torch.testing.assert_close(
        model.v.blocks[0].attn.qkv.weight, imagenet.blocks[0].attn.qkv.weight
    )
    grid = imagenet.pos_embed.detach()[:, 2:].reshape(1, 14, 14, 64).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(14, 29), mode="bilinear")[:, :, 1:13, :]  # time, then freq
    expected = torch.cat(
        [imagenet.pos_embed.detach()[:, :2], grid.reshape(1, 64, 12 * 29).transpose(1, 2)], dim=1
    )
    torch.testing.assert_close(model.v.pos_embed.detach(), expected)


def test_cnn_from_imagenet_weights_sums_rgb_stem(tmp_path):
    imagenet = timm.create_model("tf_efficientnet_b0")
    path = tmp_path / "effnet_b0.pth"
    torch.save(imagenet.state_dict(), path)
    cfg = ModelConfig(**{**CNN.__dict__, "imagenet_weights": str(path)})
    model = build_model(cfg, num_classes=4, input_tdim=64)
    torch.testing.assert_close(
        model.effnet.conv_stem.weight, imagenet.conv_stem.weight.sum(dim=1, keepdim=True)
    )
    torch.testing.assert_close(model.effnet.conv_head.weight, imagenet.conv_head.weight)


# bf16 convolutions are emulated (slow) on most CPUs: the CNN gets a small spectrogram.
@pytest.mark.parametrize(
    ("cfg", "shape"),
    [
        pytest.param(TINY_AST, (2, 64, 128), id="ast"),
        pytest.param(CNN, (1, 32, 64), id="cnn", marks=pytest.mark.slow),
    ],
)
def test_bf16_forward_on_cpu(cfg, shape):
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=5, input_tdim=shape[1], input_fdim=shape[2]).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        ref = model(x)
        out = model.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1 * ref.abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cfg", [TINY_AST, CNN], ids=["ast", "cnn"])
def test_bf16_forward_on_gpu(cfg):
    model = build_model(cfg, num_classes=5, input_tdim=1024).eval().cuda()
    x = torch.randn(4, 1024, 128, device="cuda")
    with torch.no_grad():
        ref = model(x)
        out = model.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1 * ref.abs().max().item())


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"efficientnet_b0\.\.b7"):
        build_model(ModelConfig(arch="efficientnet", name="resnet50"), num_classes=2, input_tdim=64)
    with pytest.raises(ValueError, match="not a timm ViT/DeiT"):
        build_model(ModelConfig(arch="ast", name="resnet10t"), num_classes=2, input_tdim=64)
    with pytest.raises(ValueError, match="target_length"):
        build_model(TINY_AST, num_classes=2, input_tdim=8)

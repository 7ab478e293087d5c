"""Released-checkpoint layouts load into our models and give the reference models' outputs.

The references are written here from the AST / PSLA code (ast_models.py, Models.py,
HigherModels.py) on top of timm's DeiT and efficientnet_pytorch, independent of
cmkd_scale.models; their state dicts are saved with DataParallel's ``module.`` prefix.
"""

from __future__ import annotations

import pytest
import timm
import torch
from efficientnet_pytorch import EfficientNet
from torch import nn

from cmkd_scale.config import ModelConfig
from cmkd_scale.models import CheckpointError, build_model, load_pretrained

TINY = {"embed_dim": 64, "depth": 2, "num_heads": 2}
DEIT = "deit_tiny_distilled_patch16_224"


def randomize(module: nn.Module, seed: int) -> None:
    """Perturb every float parameter and buffer so that no tensor keeps its default value.

    Weights keep their init scale (x1 +- 20 %) so activations keep theirs through deep nets;
    BN statistics, biases and 1-d parameters get random values (variances positive).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=gen)
            if name.endswith("running_var"):
                tensor.copy_(1.0 + 0.2 * noise.abs())
            elif tensor.dim() <= 1 or name.endswith(("running_mean", "bias")):
                tensor.copy_(0.1 * noise + (1.0 if name.endswith("weight") else 0.0))
            else:
                tensor.mul_(1.0 + 0.2 * noise)
            if tensor.abs().max() == 0:
                tensor.copy_(0.02 * noise)  # zero-initialised tokens/embeddings


def calibrate_batchnorm(module: nn.Module, frames: int, seed: int) -> nn.Module:
    """Set every BatchNorm's running statistics from a few random inputs, then eval().

    Random weights with random running statistics leave a deep CNN's output nearly constant
    (the same logits for every clip to 1e-7), so a test comparing two input pipelines could
    not tell them apart; calibrated statistics keep the output sensitive to the input.
    """
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    module.train()
    with torch.no_grad():
        for _ in range(4):
            module(torch.randn(3, frames, 128, generator=gen))
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = 0.1
    module.eval()
    with torch.no_grad():
        out = module(torch.randn(2, frames, 128, generator=gen))
    assert (out[0] - out[1]).abs().max() > 1e-2, "the reference model ignores its input"
    return module


def save_data_parallel(module: nn.Module, path) -> None:
    torch.save({f"module.{k}": v for k, v in module.state_dict().items()}, path)


# ------------------------------------------------------------------------- AST reference


class ReferenceAST(nn.Module):
    """AST's ASTModel (imagenet_pretrain=False) on a timm DeiT, AST's forward."""

    def __init__(self, label_dim: int, input_tdim: int, fstride: int = 10, tstride: int = 10):
        super().__init__()
        self.v = timm.create_model(DEIT, **TINY)
        dim = self.v.pos_embed.shape[2]
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, label_dim))
        self.v.patch_embed.proj = nn.Conv2d(1, dim, kernel_size=(16, 16), stride=(fstride, tstride))
        probe = self.v.patch_embed.proj(torch.zeros(1, 1, 128, input_tdim))
        num_patches = probe.shape[2] * probe.shape[3]
        self.v.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 2, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(1).transpose(2, 3)
        batch = x.shape[0]
        x = self.v.patch_embed.proj(x).flatten(2).transpose(1, 2)
        cls_tokens = self.v.cls_token.expand(batch, -1, -1)
        dist_token = self.v.dist_token.expand(batch, -1, -1)
        x = torch.cat((cls_tokens, dist_token, x), dim=1) + self.v.pos_embed
        x = self.v.pos_drop(x)
        for blk in self.v.blocks:
            x = blk(x)
        x = self.v.norm(x)
        return self.mlp_head((x[:, 0] + x[:, 1]) / 2)


def tiny_ast(num_classes: int, input_tdim: int) -> nn.Module:
    cfg = ModelConfig(arch="ast", name=DEIT, **TINY)
    return build_model(cfg, num_classes=num_classes, input_tdim=input_tdim).eval()


def test_ast_layout_loads_and_matches_reference(tmp_path):
    ref = ReferenceAST(label_dim=7, input_tdim=100).eval()
    randomize(ref, seed=1)
    path = tmp_path / "audioset_ast.pth"
    save_data_parallel(ref, path)  # includes AST's unused v.head / v.head_dist

    ours = tiny_ast(num_classes=7, input_tdim=100)
    load_pretrained(ours, str(path))
    x = torch.randn(3, 100, 128)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_ast_shorter_input_cuts_pos_embed_from_the_middle(tmp_path):
    ref = ReferenceAST(label_dim=7, input_tdim=200).eval()  # 12 x 19 patches
    randomize(ref, seed=2)
    path = tmp_path / "ast_200.pth"
    save_data_parallel(ref, path)

    ours = tiny_ast(num_classes=7, input_tdim=100)  # 12 x 9 patches
    load_pretrained(ours, str(path))
    old = ref.v.pos_embed.detach()[:, 2:].reshape(1, 12, 19, -1)
    expected = old[:, :, 19 // 2 - 9 // 2 : 19 // 2 - 9 // 2 + 9].reshape(1, 12 * 9, -1)
    torch.testing.assert_close(ours.v.pos_embed.detach()[:, 2:], expected)
    torch.testing.assert_close(ours.v.pos_embed.detach()[:, :2], ref.v.pos_embed.detach()[:, :2])


def test_new_label_set_needs_strict_false(tmp_path):
    ref = ReferenceAST(label_dim=7, input_tdim=100).eval()
    randomize(ref, seed=3)
    path = tmp_path / "ast.pth"
    save_data_parallel(ref, path)

    ours = tiny_ast(num_classes=3, input_tdim=100)
    with pytest.raises(CheckpointError, match=r"mlp_head\.1\.weight.*strict=False"):
        load_pretrained(ours, str(path))
    head_before = ours.mlp_head[1].weight.detach().clone()
    load_pretrained(ours, str(path), strict=False)
    torch.testing.assert_close(ours.mlp_head[1].weight.detach(), head_before)
    torch.testing.assert_close(ours.v.blocks[1].mlp.fc2.weight, ref.v.blocks[1].mlp.fc2.weight)


def test_unmapped_key_is_named_with_the_layout(tmp_path):
    ref = ReferenceAST(label_dim=7, input_tdim=100)
    state = {f"module.{k}": v for k, v in ref.state_dict().items()}
    state["module.v.blocks.0.attn.rel_pos_bias"] = torch.zeros(4)
    path = tmp_path / "odd.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"layout 'ast'.*v\.blocks\.0\.attn\.rel_pos_bias"):
        load_pretrained(tiny_ast(num_classes=7, input_tdim=100), str(path))


def test_export_layout_round_trip(tmp_path):
    model = tiny_ast(num_classes=4, input_tdim=64)
    randomize(model, seed=4)
    path = tmp_path / "export.pt"
    torch.save({"model": model.state_dict(), "config": {"model": {"arch": "ast"}}}, path)
    fresh = tiny_ast(num_classes=4, input_tdim=64)
    load_pretrained(fresh, str(path))
    x = torch.randn(2, 64, 128)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


def test_unreadable_and_missing_files(tmp_path):
    model = tiny_ast(num_classes=4, input_tdim=64)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(model, str(tmp_path / "nope.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=r"junk\.pth"):
        load_pretrained(model, str(junk))


# ------------------------------------------------------------------------ PSLA reference


class ReferenceMHeadAttention(nn.Module):
    """PSLA HigherModels.MHeadAttention (att sigmoid, cla sigmoid or linear)."""

    def __init__(self, n_in: int, n_out: int, cla_activation: str, head_num: int = 4):
        super().__init__()
        self.head_num = head_num
        self.cla_activation = cla_activation
        self.att = nn.ModuleList(nn.Conv2d(n_in, n_out, 1) for _ in range(head_num))
        self.cla = nn.ModuleList(nn.Conv2d(n_in, n_out, 1) for _ in range(head_num))
        self.head_weight = nn.Parameter(torch.tensor([1.0 / head_num] * head_num))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_out = []
        for i in range(self.head_num):
            att = torch.sigmoid(self.att[i](x))[:, :, :, 0]
            cla = self.cla[i](x)
            cla = (torch.sigmoid(cla) if self.cla_activation == "sigmoid" else cla)[:, :, :, 0]
            att = torch.clamp(att, 1e-7, 1.0 - 1e-7)
            norm_att = att / torch.sum(att, dim=2)[:, :, None]
            x_out.append(torch.sum(norm_att * cla, dim=2) * self.head_weight[i])
        return torch.stack(x_out, dim=0).sum(dim=0)


class ReferenceEffNetAttention(nn.Module):
    """PSLA Models.EffNetAttention (pretrain=False) on efficientnet_pytorch."""

    def __init__(self, label_dim: int, b: int, cla_activation: str):
        super().__init__()
        middim = [1280, 1280, 1408, 1536, 1792, 2048, 2304, 2560]
        self.effnet = EfficientNet.from_name(f"efficientnet-b{b}", in_channels=1)
        self.attention = ReferenceMHeadAttention(middim[b], label_dim, cla_activation)
        self.avgpool = nn.AvgPool2d((4, 1))
        self.effnet._fc = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(1).transpose(2, 3)
        x = self.effnet.extract_features(x)
        x = self.avgpool(x).transpose(2, 3)
        return self.attention(x)


@pytest.mark.parametrize(
    ("variant", "cla_activation", "frames"),
    [(0, "sigmoid", 96), (2, "linear", 203)],  # B2: PSLA's static pads differ from timm's
)
def test_psla_layout_loads_and_matches_reference(tmp_path, variant, cla_activation, frames):
    ref = ReferenceEffNetAttention(label_dim=6, b=variant, cla_activation=cla_activation).eval()
    randomize(ref, seed=variant)
    with torch.no_grad():
        ref.attention.head_weight.fill_(0.25)  # outputs stay probabilities for the sigmoid head
    calibrate_batchnorm(ref, frames, seed=variant)
    path = tmp_path / f"psla_b{variant}.pth"
    save_data_parallel(ref, path)

    cfg = ModelConfig(
        arch="efficientnet", name=f"efficientnet_b{variant}", cla_activation=cla_activation
    )
    ours = build_model(cfg, num_classes=6, input_tdim=frames).eval()
    load_pretrained(ours, str(path))
    x = torch.randn(2, frames, 128)
    with torch.no_grad():
        spec = x.unsqueeze(1).transpose(2, 3)
        ref_features = ref.effnet.extract_features(spec)
        features = ours.effnet.forward_features(spec)
        expected = ref(x)
        got = ours(x)
    scale = ref_features.abs().max()
    torch.testing.assert_close(features / scale, ref_features / scale, rtol=0, atol=1e-5)
    if cla_activation == "sigmoid":
        got = torch.sigmoid(got)  # ours returns logits of PSLA's probabilities
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_psla_checkpoint_into_ast_names_the_keys(tmp_path):
    ref = ReferenceEffNetAttention(label_dim=6, b=0, cla_activation="linear")
    path = tmp_path / "psla.pth"
    save_data_parallel(ref, path)
    with pytest.raises(CheckpointError, match=r"layout 'psla'.*effnet\._conv_stem\.weight"):
        load_pretrained(tiny_ast(num_classes=6, input_tdim=64), str(path))

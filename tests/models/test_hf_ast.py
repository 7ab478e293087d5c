"""Hugging Face transformers AST checkpoints load as our AST (models/hf_ast.py).

The reference is transformers' own ASTForAudioClassification (random init, every weight then
perturbed, save_pretrained): our model gives its logits; its feature settings come along to
the teacher (adapted from the student's batch) and to infer.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification

from cmkd_scale.config import DataConfig, TeacherConfig
from cmkd_scale.distill.teacher import build_teacher
from cmkd_scale.models.hf_ast import hf_export, is_hf_ast, read_export
from tests.models.test_load import randomize

HF_MEAN, HF_STD = -5.0, 4.0  # the checkpoint's own normalisation (not the student's)
FRAMES = 100


def save_hf_ast(folder, *, num_labels: int = 5, frames: int = FRAMES, seed: int = 0):
    """A random tiny ASTForAudioClassification + its feature extractor, saved as on the hub."""
    torch.manual_seed(seed)
    config = ASTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=256,
        max_length=frames,
        num_mel_bins=128,
        num_labels=num_labels,
        time_stride=12,
        id2label={i: f"sound {i}" for i in range(num_labels)},
        label2id={f"sound {i}": i for i in range(num_labels)},
    )
    model = ASTForAudioClassification(config).eval()
    randomize(model, seed=seed)
    model.save_pretrained(folder)
    ASTFeatureExtractor(max_length=frames, mean=HF_MEAN, std=HF_STD).save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_ast") / "ast-tiny"
    return folder, save_hf_ast(folder)


def test_same_logits_as_transformers(hf_dir):
    folder, reference = hf_dir
    assert is_hf_ast(folder) and not is_hf_ast(folder.parent)
    export = hf_export(folder)
    ours = export.model()
    x = torch.randn(3, FRAMES, 128)
    with torch.no_grad():
        expected = reference(input_values=x).logits
        got = ours(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # the comparison sees the input: the logits of two clips differ far beyond the tolerance
    assert (expected[0] - expected[1]).abs().max() > 1e-3


def test_its_feature_settings_and_classes_come_along(hf_dir):
    folder, _ = hf_dir
    export = read_export(folder)
    data = export.cfg.data
    assert (data.target_length, data.num_mel_bins) == (FRAMES, 128)
    assert (data.norm_mean, data.norm_std) == (HF_MEAN, HF_STD)
    assert export.class_names == [f"sound {i}" for i in range(5)]
    assert json.loads((folder / "config.json").read_text())["layer_norm_eps"] == 1e-12
    assert export.cfg.model.layer_norm_eps == 1e-12


def test_as_a_teacher_it_sees_its_own_input(hf_dir):
    """The student's batch (AST stats, 120 frames) -> the checkpoint's (its stats, 100)."""
    folder, reference = hf_dir
    student = DataConfig(target_length=120)
    teacher = build_teacher(
        TeacherConfig(arch="ast", checkpoint=str(folder), dtype="fp32"),
        num_classes=5,
        input_tdim=120,
        input_fdim=128,
        device=torch.device("cpu"),
        student=student,
    )
    f = torch.randn(2, 120, 128) * 3 - 4  # log-mel
    x_student = (f - student.norm_mean) / (2 * student.norm_std)
    x_hf = (f[:, :FRAMES] - HF_MEAN) / (2 * HF_STD)  # ASTFeatureExtractor: truncate, normalise
    with torch.no_grad():
        expected = reference(input_values=x_hf).logits
    torch.testing.assert_close(teacher(x_student), expected, rtol=1e-4, atol=1e-5)


def test_infer_reads_it_with_its_settings(hf_dir):
    from cmkd_scale.serve.infer import ModelOptions, load_classifier

    folder, _ = hf_dir
    clf = load_classifier(ModelOptions(checkpoint=str(folder), device="cpu"))
    assert (clf.target_length, clf.norm_mean, clf.norm_std) == (FRAMES, HF_MEAN, HF_STD)
    assert clf.class_names[0] == "sound 0" and clf.activation == "sigmoid"

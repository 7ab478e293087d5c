"""A teacher gets its own input settings (distill/teacher.py, InputAdapter).

- A released PSLA-layout checkpoint (efficientnet_pytorch reference model, PSLA's normalisation
  and frame count) built the way the trainer builds its teacher, fed the student's AST-normalised
  batch, gives the logits of the same checkpoint run standalone on PSLA's own features.
- What cannot be adapted exactly is refused with both settings named: other mel bins (declared
  or from an export), more frames than the student has unless stated.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchaudio

from cmkd_scale.config import ConfigError, DataConfig, TeacherConfig, load_config
from cmkd_scale.distill.teacher import (
    InputAdapter,
    InputSettings,
    TeacherInputError,
    build_teacher,
)
from cmkd_scale.models.exported import Export
from tests.models.test_load import (
    ReferenceEffNetAttention,
    calibrate_batchnorm,
    randomize,
    save_data_parallel,
)

AST_NORM = (-4.2677393, 4.5689974)  # the student's (AST's AudioSet stats)
PSLA_NORM = (-4.6476, 4.5699)  # PSLA egs/audioset/run.sh
CPU = torch.device("cpu")


def _fbank(seconds: float, seed: int) -> torch.Tensor:
    """Kaldi log-mel of a noisy chirp, as AST's and PSLA's dataloaders compute it."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(int(16000 * seconds)) / 16000
    wave = 0.3 * torch.sin(2 * math.pi * (300 + 900 * t) * t) + 0.05 * torch.randn(
        t.shape, generator=gen
    )
    return torchaudio.compliance.kaldi.fbank(
        wave[None],
        htk_compat=True,
        sample_frequency=16000,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=128,
        dither=0.0,
        frame_shift=10,
    )


def _reference_input(fbank: torch.Tensor, frames: int, mean: float, std: float) -> torch.Tensor:
    """PSLA/AST dataloader: zero-pad or keep the first frames, then (x - mean) / (2 std)."""
    p = frames - fbank.shape[0]
    fbank = torch.nn.ZeroPad2d((0, 0, 0, p))(fbank) if p > 0 else fbank[:frames]
    return (fbank - mean) / (std * 2)


@pytest.fixture(scope="module")
def psla_checkpoint(tmp_path_factory):
    ref = ReferenceEffNetAttention(label_dim=6, b=0, cla_activation="linear").eval()
    randomize(ref, seed=7)
    calibrate_batchnorm(ref, frames=144, seed=7)  # logits that depend on the input
    path = tmp_path_factory.mktemp("psla") / "psla_b0.pth"
    save_data_parallel(ref, path)  # a released PSLA .pth: weights only, no settings
    return ref, path


@pytest.mark.parametrize(
    ("seconds", "student_frames", "teacher_frames", "pad"),
    [
        (1.2, 128, 144, True),  # 118 frames: the teacher pads further (clips fit: exact)
        (1.5, 160, 112, False),  # 148 frames: the teacher keeps its first 112 (always exact)
    ],
)
def test_psla_teacher_in_the_trainer_matches_psla_on_its_own_features(
    psla_checkpoint, seconds, student_frames, teacher_frames, pad
):
    ref, path = psla_checkpoint
    clips = [_fbank(seconds, seed) for seed in range(3)]
    student = DataConfig(target_length=student_frames, norm_mean=AST_NORM[0], norm_std=AST_NORM[1])
    # the student's batch, as the loader hands it to the trainer
    x_student = torch.stack([_reference_input(f, student_frames, *AST_NORM) for f in clips])
    # PSLA standalone, on PSLA's own features
    x_psla = torch.stack([_reference_input(f, teacher_frames, *PSLA_NORM) for f in clips])
    with torch.no_grad():
        expected = ref(x_psla)

    cfg = load_config(
        None,
        [
            "teacher.arch=efficientnet",
            "teacher.name=efficientnet_b0",
            "teacher.pooling=attention",
            "teacher.attention_heads=4",
            "teacher.cla_activation=linear",
            f"teacher.checkpoint={path}",
            "teacher.dtype=fp32",
            f"teacher.norm_mean={PSLA_NORM[0]}",
            f"teacher.norm_std={PSLA_NORM[1]}",
            f"teacher.target_length={teacher_frames}",
            "teacher.num_mel_bins=128",
            f"teacher.pad_input={str(pad).lower()}",
        ],
    ).teacher
    teacher = build_teacher(  # as Trainer.__init__ calls it
        cfg,
        num_classes=6,
        input_tdim=student_frames,
        input_fdim=128,
        device=CPU,
        student=student,
    )
    got = teacher(x_student)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # before: the same checkpoint fed the student's input as it is
    with torch.no_grad():
        unadapted = teacher.model(x_student)
    assert (unadapted - expected).abs().max() > 100 * (got - expected).abs().max()


def test_renormalisation_is_the_affine_map_on_the_log_mel():
    student = InputSettings(128, 8, *AST_NORM)
    teacher = InputSettings(128, 8, *PSLA_NORM)
    f = torch.randn(2, 8, 128) * 4 - 4
    f[:, 6:] = 0.0  # padding / a time mask: f = 0
    x_s = (f - AST_NORM[0]) / (2 * AST_NORM[1])
    x_t = (f - PSLA_NORM[0]) / (2 * PSLA_NORM[1])
    torch.testing.assert_close(InputAdapter(student, teacher)(x_s), x_t, rtol=0, atol=1e-5)
    assert InputAdapter(student, student).identity


def test_other_mel_bins_are_refused_naming_both_settings():
    student = DataConfig(target_length=64, num_mel_bins=128)
    cfg = TeacherConfig(
        arch="efficientnet", name="random:efficientnet_b0", num_mel_bins=64, dtype="fp32"
    )
    with pytest.raises(TeacherInputError) as info:
        build_teacher(
            cfg, num_classes=3, input_tdim=64, input_fdim=128, device=CPU, student=student
        )
    msg = str(info.value)
    assert "student (data.*): 128 mel bins, 64 frames" in msg
    assert "teacher: 64 mel bins, 64 frames" in msg
    assert isinstance(info.value, ConfigError)


def test_an_export_s_own_settings_are_used_and_a_mismatch_refused(tmp_path):
    from cmkd_scale.models import build_model

    trained = load_config(
        None,
        [
            "model.arch=efficientnet",
            "model.name=efficientnet_b0",
            "data.num_mel_bins=64",
            "data.target_length=48",
        ],
    )
    model = build_model(trained.model, num_classes=3, input_tdim=48, input_fdim=64)
    path = Export(state_dict=model.state_dict(), config=trained.to_dict(), num_classes=3).save(
        tmp_path / "teacher.pt"
    )
    cfg = TeacherConfig(arch="efficientnet", name="efficientnet_b0", checkpoint=str(path))
    student = DataConfig(target_length=48, num_mel_bins=128)
    with pytest.raises(TeacherInputError, match=r"128 mel bins.*teacher: 64 mel bins"):
        build_teacher(
            cfg, num_classes=3, input_tdim=48, input_fdim=128, device=CPU, student=student
        )
    # a declared value that contradicts the export is refused too
    stated = TeacherConfig(
        arch="efficientnet", name="efficientnet_b0", checkpoint=str(path), num_mel_bins=128
    )
    with pytest.raises(ConfigError, match=r"teacher\.num_mel_bins.*export's data\.num_mel_bins"):
        build_teacher(
            stated, num_classes=3, input_tdim=48, input_fdim=128, device=CPU, student=student
        )


def test_more_frames_than_the_student_has_needs_pad_input():
    student = DataConfig(target_length=64)
    cfg = TeacherConfig(
        arch="efficientnet", name="random:efficientnet_b0", target_length=96, dtype="fp32"
    )
    with pytest.raises(TeacherInputError, match=r"teacher\.pad_input=true.*data\.target_length"):
        build_teacher(
            cfg, num_classes=3, input_tdim=64, input_fdim=128, device=CPU, student=student
        )

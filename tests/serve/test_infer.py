"""Inference CLI on real audio files, and the ONNX export with its output check."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from cmkd_scale.config import Config, DataConfig, ModelConfig
from cmkd_scale.data.reference import ast_features
from cmkd_scale.models import build_model
from cmkd_scale.models.exported import Export
from cmkd_scale.serve import infer
from cmkd_scale.serve import onnx_export as export

NAMES = ["dog", "cat", "rain", "siren"]
TARGET = 100  # 1 s windows keep the CPU cost small


def tiny_config() -> Config:
    model = ModelConfig(
        arch="ast", name="deit_tiny_distilled_patch16_224", embed_dim=32, depth=1, num_heads=2
    )
    return Config(model=model, data=DataConfig(target_length=TARGET))


@pytest.fixture(scope="module")
def export_file(tmp_path_factory):
    """An export as the trainer writes it: model, config, num_classes, class_names."""
    cfg = tiny_config()
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=len(NAMES), input_tdim=TARGET)
    path = tmp_path_factory.mktemp("export") / "best.pt"
    Export(
        state_dict=model.state_dict(),
        config=cfg.to_dict(),
        num_classes=len(NAMES),
        class_names=NAMES,
    ).save(path)
    return path, model.eval()


@pytest.fixture(scope="module")
def long_flac(tmp_path_factory):
    """25.3 s of noise at 22.05 kHz stereo (resampled and down-mixed by the reader)."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("audio") / "long.flac"
    sf.write(path, (rng.standard_normal((int(25.3 * 22050), 2)) * 0.1).astype(np.float32), 22050)
    return path


def test_window_starts():
    assert infer.window_starts(80, 100, 100) == [0]
    assert infer.window_starts(100, 100, 100) == [0]
    assert infer.window_starts(250, 100, 100) == [0, 100, 150]
    assert infer.window_starts(250, 100, 50) == [0, 50, 100, 150]


def test_text_output_on_real_clips(export_file, real_clip_wav, real_clip_mp3, capsys):
    path, _ = export_file
    code = infer.main(
        ["--checkpoint", str(path), "--top-k", "3", str(real_clip_wav), str(real_clip_mp3)]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert f"{real_clip_wav}  (7.00 s, 7 window(s))" in out  # 698 frames -> 0..500 + 598
    assert f"{real_clip_mp3}  (" in out
    assert sum(line.startswith("  0.") for line in out.splitlines()) == 6


def test_json_matches_the_reference_features(export_file, real_clip_wav, capsys):
    """infer.s probabilities = max over windows of sigmoid(model(AST.s features))."""
    path, model = export_file
    code = infer.main(["--checkpoint", str(path), "--json", "--top-k", "4", str(real_clip_wav)])
    assert code == 0
    result = json.loads(capsys.readouterr().out)["results"][0]
    assert result["windows"] == 7 and result["duration_s"] == pytest.approx(7.0, abs=0.01)
    probs = [item["prob"] for item in result["top"]]
    assert probs == sorted(probs, reverse=True)
    assert {item["label"] for item in result["top"]} == set(NAMES)

    # AST's feature code on the whole clip (7 s = 698 frames), then the windows 0..500 + 598
    wave = torch.from_numpy(infer.read_wave(str(real_clip_wav)))
    full = ast_features(
        wave, target_length=698, norm_mean=DataConfig.norm_mean, norm_std=DataConfig.norm_std
    )
    windows = [full[start : start + TARGET] for start in (0, 100, 200, 300, 400, 500, 598)]
    with torch.no_grad():
        expected = torch.sigmoid(model(torch.stack(windows))).max(dim=0).values
    got = {item["index"]: item["prob"] for item in result["top"]}
    for index, prob in got.items():
        assert prob == pytest.approx(expected[index].item(), abs=1e-5)


def test_long_file_windows_and_mean_pool(export_file, long_flac, capsys):
    path, _ = export_file
    code = infer.main(
        [
            "--checkpoint",
            str(path),
            "--json",
            "--window-pool",
            "mean",
            "--hop",
            "50",
            str(long_flac),
        ]
    )
    result = json.loads(capsys.readouterr().out)["results"][0]
    assert code == 0
    assert result["duration_s"] == pytest.approx(25.3, abs=0.01)
    # 2528 frames, 100-frame windows every 50 frames: starts 0..2400 (49) + the end-aligned 2428
    assert result["windows"] == 50


def test_a_bad_file_does_not_lose_the_others(export_file, real_clip_wav, tmp_path, capsys):
    path, _ = export_file
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    code = infer.main(["--checkpoint", str(path), "--json", str(broken), str(real_clip_wav)])
    results = json.loads(capsys.readouterr().out)["results"]
    assert code == 1
    assert "error" in results[0] and results[0]["file"] == str(broken)
    assert len(results[1]["top"]) == 4


def test_released_checkpoint_needs_arch(tmp_path, real_clip_wav, capsys):
    torch.manual_seed(1)
    cnn = build_model(
        ModelConfig(arch="efficientnet", name="efficientnet_b0"), num_classes=527, input_tdim=TARGET
    )
    path = tmp_path / "cnn_released.pth"
    torch.save({f"module.{k}": v for k, v in cnn.state_dict().items()}, path)

    assert infer.main(["--checkpoint", str(path), str(real_clip_wav)]) == 2
    assert "--arch" in capsys.readouterr().err

    code = infer.main(
        [
            "--checkpoint",
            str(path),
            "--arch",
            "efficientnet",
            "--model-name",
            "efficientnet_b0",
            "--target-length",
            "300",
            "--json",
            str(real_clip_wav),
        ]
    )
    result = json.loads(capsys.readouterr().out)["results"][0]
    assert code == 0
    assert result["windows"] == 3  # 698 frames: 0, 300, 398
    assert all(item["label"] for item in result["top"])  # AudioSet names for 527 classes
    assert "Speech" in {n for n in infer.audioset_names()}


@pytest.mark.slow
def test_onnx_export_reproduces_the_model(export_file, tmp_path, capsys):
    path, model = export_file
    out = tmp_path / "student.onnx"
    assert export.main(["--checkpoint", str(path), "--out", str(out)]) == 0
    check = json.loads(capsys.readouterr().out)
    assert check["max_abs_diff"] <= 1e-4
    info = json.loads((tmp_path / "student.onnx.json").read_text())
    assert info["class_names"] == NAMES and info["features"]["target_length"] == TARGET

    import onnxruntime as ort

    x = torch.randn(5, TARGET, 128)
    got = ort.InferenceSession(str(out)).run(["logits"], {"fbank": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), atol=1e-4)


@pytest.mark.slow
def test_failed_export_check_writes_nothing(export_file, tmp_path, capsys):
    path, _ = export_file
    out = tmp_path / "student.onnx"
    assert export.main(["--checkpoint", str(path), "--out", str(out), "--atol", "-1"]) == 2
    assert "was not written" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob("*.partial"))

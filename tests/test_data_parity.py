"""The DALI graph's log-mel equals torchaudio's Kaldi fbank (AST settings) incl. DC removal."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from fixtures_data import SR, decoded, flac_bytes, run_graph

from cmkd_scale.data.pipeline import FeatureSpec
from cmkd_scale.data.reference import kaldi_fbank

TOLERANCE = 0.05  # max abs difference on the unnormalised log-mel, all 128 bins
RAW = FeatureSpec(target_length=None, normalize=False)


def _generated(seconds: float, seed: int = 0) -> dict[str, np.ndarray]:
    """Noise, a chirp, tones with a DC offset, clicks over silence: all ``seconds`` long."""
    rng = np.random.default_rng(seed)
    n = round(seconds * SR)
    t = np.arange(n) / SR
    chirp = 0.5 * np.sin(2 * np.pi * (50 * t + (7950 - 50) / (2 * max(seconds, 1e-3)) * t**2))
    tones = 0.2 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 3000 * t) + 0.3
    clicks = np.zeros(n)
    clicks[:: max(n // 7, 1)] = 0.9
    return {
        "noise": np.clip(0.2 * rng.standard_normal(n), -1, 1),
        "chirp": chirp,
        "tones+dc": tones,
        "clicks": clicks,
    }


def _assert_parity(flacs: dict[str, np.ndarray]) -> float:
    feats = run_graph(list(flacs.values()), RAW)
    worst = 0.0
    for (name, flac), ours in zip(flacs.items(), feats, strict=True):
        ref = kaldi_fbank(torch.from_numpy(decoded(flac))).numpy()
        assert ours.shape == ref.shape, name
        diff = float(np.abs(ours - ref).max())
        assert diff <= TOLERANCE, f"{name}: max abs diff {diff:.4f} > {TOLERANCE}"
        worst = max(worst, diff)
    return worst


def test_generated_10s_clips_give_998x128_matching_kaldi():
    flacs = {name: flac_bytes(w) for name, w in _generated(10.0).items()}
    feats = run_graph(list(flacs.values()), RAW)
    assert all(f.shape == (998, 128) for f in feats)
    _assert_parity(flacs)


@pytest.mark.parametrize("samples", [400, 559, 560, 16000, 52_817])
def test_other_lengths_match_kaldi(samples):
    """Kaldi's frame count 1 + (N - 400) // 160, down to a single frame."""
    flacs = {name: flac_bytes(w) for name, w in _generated(samples / SR, seed=samples).items()}
    feats = run_graph(list(flacs.values()), RAW)
    assert all(f.shape == (1 + (samples - 400) // 160, 128) for f in feats)
    _assert_parity(flacs)


def test_real_audioset_clip_matches_kaldi(real_clip_wav):
    wave, rate = sf.read(real_clip_wav, dtype="float32")
    assert rate == 32000
    wave16 = torchaudio.functional.resample(torch.from_numpy(wave), rate, SR).numpy()
    ten_s = np.resize(wave16, 10 * SR)  # also a full 10 s clip: the real one looped
    flacs = {"real 7 s": flac_bytes(wave16), "real 10 s": flac_bytes(ten_s)}
    feats = run_graph(list(flacs.values()), RAW)
    assert feats[0].shape == (698, 128) and feats[1].shape == (998, 128)
    _assert_parity(flacs)


def test_dc_removal_is_what_makes_it_match(real_clip_wav):
    """Control: without Kaldi's per-frame DC removal the low bins are far off, so the parity
    tests above do measure it."""
    wave, rate = sf.read(real_clip_wav, dtype="float32")
    flac = flac_bytes(torchaudio.functional.resample(torch.from_numpy(wave), rate, SR).numpy())
    (ours,) = run_graph([flac], RAW)
    no_dc = torchaudio.compliance.kaldi.fbank(
        torch.from_numpy(decoded(flac))[None],
        htk_compat=True,
        sample_frequency=SR,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=128,
        dither=0.0,
        frame_shift=10,
        remove_dc_offset=False,
    ).numpy()
    assert np.abs(ours - no_dc).max() > 10 * TOLERANCE


def test_pad_crop_and_normalisation_follow_ast():
    flac = flac_bytes(_generated(1.0)["noise"])  # 98 frames
    raw = kaldi_fbank(torch.from_numpy(decoded(flac))).numpy()
    mean, std = -4.0, 3.0
    padded, cropped = (
        run_graph([flac], FeatureSpec(target_length=length, norm_mean=mean, norm_std=std))[0]
        for length in (128, 64)
    )
    assert padded.shape == (128, 128) and cropped.shape == (64, 128)
    # AST pads with raw-log-mel zeros, then normalises: padding rows hold (0 - mean) / (2 std).
    np.testing.assert_allclose(padded[98:], (0 - mean) / (2 * std))
    np.testing.assert_allclose(padded[:98], (raw - mean) / (2 * std), atol=TOLERANCE / (2 * std))
    np.testing.assert_allclose(cropped, (raw[:64] - mean) / (2 * std), atol=TOLERANCE / (2 * std))

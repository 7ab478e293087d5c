"""The DALI graph's log-mel equals torchaudio's Kaldi fbank (AST settings) incl. DC removal."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from cmkd_scale.data import kaldi_frames
from cmkd_scale.data.pipeline import FeatureSpec
from cmkd_scale.data.reference import ast_features, kaldi_fbank
from tests.fixtures.data import SR, decoded, flac_bytes, run_graph

TOLERANCE = 0.05  # max abs difference on the unnormalised log-mel, all 128 bins
# "fused": the CPU graph (one compiled kernel frames the wave); "ops": the GPU graph (DALI ops
# only), run here on the CPU so that CI checks it too.
FRAMINGS = pytest.mark.parametrize("framing", ["fused", "ops"])


def _raw(framing: str) -> FeatureSpec:
    return FeatureSpec(target_length=None, normalize=False, framing=framing)


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


def _assert_parity(flacs: dict[str, np.ndarray], framing: str) -> float:
    feats = run_graph(list(flacs.values()), _raw(framing))
    worst = 0.0
    for (name, flac), ours in zip(flacs.items(), feats, strict=True):
        ref = kaldi_fbank(torch.from_numpy(decoded(flac))).numpy()
        assert ours.shape == ref.shape, name
        diff = float(np.abs(ours - ref).max())
        assert diff <= TOLERANCE, f"{name}: max abs diff {diff:.4f} > {TOLERANCE}"
        worst = max(worst, diff)
    return worst


@FRAMINGS
def test_generated_10s_clips_give_998x128_matching_kaldi(framing):
    flacs = {name: flac_bytes(w) for name, w in _generated(10.0).items()}
    feats = run_graph(list(flacs.values()), _raw(framing))
    assert all(f.shape == (998, 128) for f in feats)
    _assert_parity(flacs, framing)


@FRAMINGS
@pytest.mark.parametrize("samples", [400, 559, 560, 16000, 52_817])
def test_other_lengths_match_kaldi(samples, framing):
    """Kaldi's frame count 1 + (N - 400) // 160, down to a single frame."""
    flacs = {name: flac_bytes(w) for name, w in _generated(samples / SR, seed=samples).items()}
    feats = run_graph(list(flacs.values()), _raw(framing))
    assert all(f.shape == (1 + (samples - 400) // 160, 128) for f in feats)
    _assert_parity(flacs, framing)


@FRAMINGS
def test_real_audioset_clip_matches_kaldi(real_clip_wav, framing):
    wave, rate = sf.read(real_clip_wav, dtype="float32")
    assert rate == 32000
    wave16 = torchaudio.functional.resample(torch.from_numpy(wave), rate, SR).numpy()
    ten_s = np.resize(wave16, 10 * SR)  # also a full 10 s clip: the real one looped
    flacs = {"real 7 s": flac_bytes(wave16), "real 10 s": flac_bytes(ten_s)}
    feats = run_graph(list(flacs.values()), _raw(framing))
    assert feats[0].shape == (698, 128) and feats[1].shape == (998, 128)
    _assert_parity(flacs, framing)


@FRAMINGS
def test_mixup_matches_ast(framing):
    """AST's waveform mixup with partners shorter (zero-padded) and longer (cut) than the
    clip, a partner with a DC offset (centred before padding), and an unmixed clip."""
    waves = _generated(10.0, seed=3)
    clips = [waves["noise"], waves["chirp"], waves["clicks"]]
    partners = [waves["tones+dc"][: 3 * SR], np.resize(waves["noise"], 12 * SR), None]
    lams = [0.3, 0.8, 1.0]
    flacs = [flac_bytes(w) for w in clips]
    partner_flacs = [None if p is None else flac_bytes(p) for p in partners]
    feats = run_graph(flacs, _raw(framing), partners=partner_flacs, lams=lams, device="cpu")
    for flac, other, lam, ours in zip(flacs, partner_flacs, lams, feats, strict=True):
        ref = ast_features(
            torch.from_numpy(decoded(flac)),
            partner=None if other is None else torch.from_numpy(decoded(other)),
            lam=lam,
            target_length=998,
            norm_mean=0.0,
            norm_std=0.5,  # (x - 0) / (2 * 0.5): the raw log-mel
        ).numpy()
        assert ours.shape == ref.shape == (998, 128)
        assert np.abs(ours - ref).max() <= TOLERANCE


def test_fused_kernel_frames_equal_kaldi_framing():
    """The kernel's windowed frames (mean removed, pre-emphasised) against NumPy float64."""
    wave = (0.3 * np.random.default_rng(0).standard_normal(52_817) + 0.2).astype(np.float32)
    emphasised = np.empty_like(wave)
    frames = np.empty((kaldi_frames.frame_count(len(wave)), 400), np.float32)
    kaldi_frames._emphasise(emphasised, wave)
    kaldi_frames._write_frames(frames, wave, emphasised)
    np.testing.assert_allclose(frames, kaldi_frames.frames_reference(wave), atol=2e-6)
    partner = np.linspace(-1, 1, 30_000, dtype=np.float32) + 0.5
    mixed = np.empty_like(wave)
    kaldi_frames._mix(mixed, wave, partner, np.float32(0.25))
    expected = 0.25 * wave.astype(np.float64)
    expected[:30_000] += 0.75 * (partner - partner.mean())
    np.testing.assert_allclose(mixed, expected, atol=1e-6)


def test_dc_removal_is_what_makes_it_match(real_clip_wav):
    """Control: without Kaldi's per-frame DC removal the low bins are far off, so the parity
    tests above do measure it."""
    wave, rate = sf.read(real_clip_wav, dtype="float32")
    flac = flac_bytes(torchaudio.functional.resample(torch.from_numpy(wave), rate, SR).numpy())
    (ours,) = run_graph([flac], _raw("auto"))
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


def test_framing_choice():
    assert FeatureSpec().fused("cpu") and not FeatureSpec().fused("gpu")
    assert not FeatureSpec(framing="ops").fused("cpu")
    with pytest.raises(ValueError, match="CPU kernel"):
        FeatureSpec(framing="fused").fused("gpu")
    with pytest.raises(ValueError, match="framing must be one of"):
        FeatureSpec(framing="numba")

"""Decoding, cutting, downmixing, resampling and FLAC encoding of single clips."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from cmkd_scale.prep.audio_io import (
    DecodeError,
    check_flac,
    decode_segment,
    encode_flac,
    to_mono_16k,
    to_pcm16,
)
from cmkd_scale.prep.clip import ClipJob, process_clip
from tests.fixtures.prep import dominant_frequency, tone, write_audio


def _band_energy(wave: np.ndarray, sr: int, lo: float, hi: float) -> float:
    spectrum = np.abs(np.fft.rfft(wave)) ** 2
    freqs = np.fft.rfftfreq(len(wave), 1 / sr)
    return float(spectrum[(freqs >= lo) & (freqs <= hi)].sum() / spectrum.sum())


def test_resampling_keeps_the_tone_and_does_not_alias() -> None:
    sr = 44100
    wave = tone(1000.0, 2.0, sr)[:, 0] + tone(10000.0, 2.0, sr)[:, 0]  # 10 kHz > 8 kHz Nyquist
    out = to_mono_16k(wave[:, None], sr)
    assert len(out) == 32000 and out.dtype == np.float32
    assert dominant_frequency(out, 16000) == pytest.approx(1000.0, abs=1)
    # naive decimation would fold 10 kHz onto 6 kHz; a proper resampler removes it
    assert _band_energy(out, 16000, 5900, 6100) < 1e-4
    assert _band_energy(out, 16000, 990, 1010) > 0.99


def test_stereo_is_averaged_to_mono() -> None:
    left, right = tone(440.0, 1.0, 16000)[:, 0], tone(660.0, 1.0, 16000)[:, 0]
    out = to_mono_16k(np.stack([left, right], axis=1), 16000)
    assert np.allclose(out, (left + right) / 2, atol=1e-6)


def test_pcm16_clips_instead_of_wrapping() -> None:
    pcm = to_pcm16(np.array([1.5, 1.0, -1.0, -2.0, 0.5], dtype=np.float32))
    assert pcm.tolist() == [32767, 32767, -32768, -32768, 16384]


def test_flac_round_trip_is_exact_and_checked() -> None:
    pcm = to_pcm16(tone(440.0, 1.0, 16000)[:, 0])
    data = encode_flac(pcm)
    assert encode_flac(pcm) == data  # deterministic encoder
    check_flac(data, pcm)
    with pytest.raises(DecodeError, match="does not decode back"):
        check_flac(data, pcm[:-1])
    back, sr = sf.read(io.BytesIO(data), dtype="int16")
    assert sr == 16000 and np.array_equal(back, pcm)


@pytest.mark.parametrize("ext", ["wav", "m4a"])  # soundfile path and PyAV path
def test_whole_video_is_cut_and_segment_files_are_kept(tmp_path: Path, ext: str) -> None:
    long = write_audio(
        tmp_path / f"long.{ext}",
        np.concatenate([tone(200.0, 12.0, 16000), tone(1200.0, 4.0, 16000)]),
        16000,
    )
    audio, sr = decode_segment(str(long), 12.0, 16.0)  # 16 s file, 4 s segment: cut
    assert abs(len(audio) - 4 * sr) < 0.03 * sr
    assert dominant_frequency(audio[:, 0], sr) == pytest.approx(1200.0, abs=2)
    near = write_audio(tmp_path / f"near.{ext}", tone(300.0, 10.8, 16000), 16000)
    audio, sr = decode_segment(str(near), 30.0, 40.0)  # within 1 s of the segment: kept as is
    # AAC adds up to 2 x 1024 samples of encoder priming/padding
    assert abs(len(audio) - 10.8 * sr) < 2048 + 0.01 * sr
    with pytest.raises(DecodeError, match="segment starts at 100"):
        decode_segment(str(long), 100.0, 104.0)


def test_truncated_mp3_is_detected(tmp_path: Path) -> None:
    mp3 = write_audio(tmp_path / "a.mp3", tone(440.0, 3.0, 44100, channels=2), 44100)
    data = mp3.read_bytes()
    (tmp_path / "t.mp3").write_bytes(data[: len(data) // 2])
    with pytest.raises(DecodeError, match="truncated"):
        decode_segment(str(tmp_path / "t.mp3"), 0.0, 3.0)


def test_process_clip_reports_instead_of_raising(tmp_path: Path) -> None:
    (tmp_path / "x.webm").write_text("<html>not a video</html>")
    res = process_clip(ClipJob(3, str(tmp_path / "x.webm"), 0.0, 10.0))
    assert res.position == 3 and res.flac is None and res.error.startswith("av:")
    ok = write_audio(tmp_path / "ok.opus", tone(440.0, 1.0, 48000), 48000)
    res = process_clip(ClipJob(4, str(ok), 0.0, 1.0))
    assert res.error is None and res.duration == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize(
    ("fmt", "subtype"), [("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("WAV", "PCM_24")]
)
def test_decoding_gives_libsndfiles_float_samples(tmp_path: Path, fmt: str, subtype: str) -> None:
    """16-bit PCM is read as int16 and scaled (the fast path): the very samples libsndfile's
    own float conversion gives, for a whole file and for a cut (seek + read) whole video."""
    rng = np.random.default_rng(0)
    stereo = np.clip(0.4 * rng.standard_normal((44100 * 14, 2)), -1, 1)
    path = tmp_path / f"clip.{fmt.lower()}"
    sf.write(path, stereo, 44100, format=fmt, subtype=subtype)
    full = sf.read(path, dtype="float32", always_2d=True)[0]
    audio, sr = decode_segment(str(path), 0.0, 14.0)
    assert sr == 44100 and audio.dtype == np.float32 and np.array_equal(audio, full)
    cut, _ = decode_segment(str(path), 2.0, 4.5)  # 14 s file, 2.5 s segment: cut
    assert np.array_equal(cut, full[2 * 44100 : 4 * 44100 + 22050])

"""Helpers for the prep tests: tones in every supported format, Google-format segment CSVs."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import av
import numpy as np
import soundfile as sf

from cmkd_scale.synth import bundled_class_labels

# Real AudioSet MIDs (from class_labels_indices.csv).
SPEECH, MUSIC, DOG, CAR = "/m/09x0r", "/m/04rlf", "/m/0bt9lr", "/m/0k4j"
SPEECH_IDX, MUSIC_IDX, DOG_IDX, CAR_IDX = 0, 137, 74, 307

# format -> (how it is written, codec, container) for the formats downloaders produce
FORMATS = ("wav", "flac", "ogg", "opus", "mp3", "m4a", "aac", "webm")


def tone(freq: float, seconds: float, sr: int, channels: int = 1, amp: float = 0.5) -> np.ndarray:
    """frames x channels float32 sine (channel c at ``freq`` with a small phase offset)."""
    t = np.arange(round(seconds * sr)) / sr
    cols = [amp * np.sin(2 * np.pi * freq * t + 0.3 * c) for c in range(channels)]
    return np.stack(cols, axis=1).astype(np.float32)


def _write_pyav(path: Path, wave: np.ndarray, sr: int, codec: str, container: str) -> None:
    layout = "mono" if wave.shape[1] == 1 else "stereo"
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream(codec, rate=sr, layout=layout)
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(wave.T), format="fltp", layout=layout
        )
        frame.sample_rate = sr
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def write_audio(path: Path, wave: np.ndarray, sr: int) -> Path:
    """Encode ``wave`` in the format named by ``path``'s extension, as downloaders produce it."""
    fmt = path.suffix.lstrip(".").lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt in ("wav", "flac"):
        sf.write(path, wave, sr)
    elif fmt == "ogg":
        sf.write(path, wave, sr, format="OGG", subtype="VORBIS")
    elif fmt == "opus":
        sf.write(path, wave, sr, format="OGG", subtype="OPUS")  # libopus: 8/12/16/24/48 kHz
    elif fmt == "mp3":
        sf.write(path, wave, sr, format="MP3")
    elif fmt == "m4a":
        _write_pyav(path, wave, sr, "aac", "ipod")
    elif fmt == "aac":
        _write_pyav(path, wave, sr, "aac", "adts")
    elif fmt == "webm":
        _write_pyav(path, wave, sr, "libopus", "webm")
    else:
        raise ValueError(f"no writer for {fmt}")
    return path


def native_rate(fmt: str, wanted: int) -> int:
    """Opus only runs at 48 kHz (and a few lower rates); everything else keeps ``wanted``."""
    return 48000 if fmt in ("opus", "webm") else wanted


def write_segments_csv(path: Path, rows: list[tuple[str, float, float, list[str]]]) -> Path:
    """A segment CSV byte-for-byte in Google's published layout."""
    lines = [
        "# Segments csv created Sun Mar  5 10:54:25 2017",
        f"# num_ysids={len(rows)}, num_segs={len(rows)}, num_unique_labels=3, "
        "num_positive_labels=4",
        "# YTID, start_seconds, end_seconds, positive_labels",
    ]
    lines += [f'{y}, {s:.3f}, {e:.3f}, "{",".join(m)}"' for y, s, e, m in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def dominant_frequency(wave: np.ndarray, sr: int) -> float:
    """Frequency (Hz) of the strongest FFT bin of a mono signal."""
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / sr)[int(np.argmax(spectrum))])


def tree_digest(root: Path) -> dict[str, str]:
    """name -> sha256 for every visible file under ``root`` (hidden temp files excluded)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def prep_cli(csv: Path, audio: Path, out: Path, shard_size: int, *extra: str) -> list[str]:
    """The ``python -m cmkd_scale.prep`` command line for one segment CSV and the bundled
    527-class index."""
    return [
        sys.executable, "-m", "cmkd_scale.prep", "--segments", str(csv),
        "--class-labels", str(bundled_class_labels()), "--audio-dir", str(audio),
        "--out", str(out), "--shard-size", str(shard_size), *extra,
    ]  # fmt: skip

"""A small, learnable dataset in AudioSet's exact on-disk format, for the demo and the tests.

Each chosen AudioSet class gets a distinct audible pattern (a tone at its own pitch, amplitude
modulated at its own rate, with a harmonic); a clip mixes 1-3 of them (overlapping labels)
with random onsets, durations and gains over a low noise floor. The segment list is written in
Google's CSV format (three ``#`` header lines, ``YTID, start, end, "mid1,mid2"``) and the
class index is AudioSet's real 527-class index, so ``prep`` sees exactly what it sees on the
real data. ``make_synthetic_shards`` takes such clips through the real prep: the one recipe for
the shards that the tests, the benchmarks and the study train on.
"""

from __future__ import annotations

import csv
import string
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import soundfile as sf

from cmkd_scale import SAMPLE_RATE

# Well-known AudioSet classes, by display name: the demo's labels come from the front of this list.
DEMO_CLASSES = (
    "Speech",
    "Music",
    "Dog",
    "Bird",
    "Car",
    "Siren",
    "Piano",
    "Rain",
    "Bell",
    "Guitar",
    "Engine",
    "Whistle",
)

_YTID_ALPHABET = string.ascii_letters + string.digits + "-_"


def bundled_class_labels() -> Path:
    """AudioSet's 527-class index shipped with the package (CC BY 4.0)."""
    return Path(str(resources.files("cmkd_scale") / "resources" / "class_labels_indices.csv"))


@dataclass(frozen=True)
class SynthClip:
    ytid: str
    start: float
    end: float
    mids: tuple[str, ...]
    path: Path


@dataclass(frozen=True)
class SynthDataset:
    segments_csv: Path
    class_labels_csv: Path
    audio_dir: Path
    clips: tuple[SynthClip, ...]
    mids: tuple[str, ...]  # the classes used, in pattern order


def _read_index(path: Path) -> dict[str, str]:
    """display_name -> mid from an AudioSet class index."""
    with open(path, newline="") as f:
        return {row["display_name"]: row["mid"] for row in csv.DictReader(f)}


def _pattern(k: int, n: int, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """Class ``k``'s event: tone at its own pitch, AM at its own rate, plus one harmonic."""
    t = np.arange(n) / sample_rate
    f0 = 220.0 * 1.45**k
    am_rate = 1.5 + 1.3 * k
    phase = rng.uniform(0, 2 * np.pi)
    tone = np.sin(2 * np.pi * f0 * t + phase) + 0.4 * np.sin(2 * np.pi * 2.01 * f0 * t)
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * am_rate * t)
    return tone * envelope


def make_synthetic_audioset(
    out_dir: Path,
    *,
    num_clips: int,
    num_classes_used: int = 8,
    duration_s: float = 3.0,
    sample_rate: int = SAMPLE_RATE,
    seed: int = 0,
    fmt: str = "wav",
    class_labels_csv: Path | None = None,
    split: str = "train",
    max_labels: int = 3,
) -> SynthDataset:
    """Write ``num_clips`` clips + a Google-format segment CSV under ``out_dir``."""
    if not 1 <= num_classes_used <= len(DEMO_CLASSES):
        raise ValueError(f"num_classes_used must be in 1..{len(DEMO_CLASSES)}")
    class_labels_csv = Path(class_labels_csv or bundled_class_labels())
    index = _read_index(class_labels_csv)
    names = DEMO_CLASSES[:num_classes_used]
    missing = [name for name in names if name not in index]
    if missing:
        raise ValueError(f"{class_labels_csv} lacks the classes {missing}")
    mids = tuple(index[name] for name in names)

    rng = np.random.default_rng(seed)
    audio_dir = Path(out_dir) / f"audio_{split}"
    audio_dir.mkdir(parents=True, exist_ok=True)
    n = round(duration_s * sample_rate)
    clips = []
    for i in range(num_clips):
        ytid = "".join(rng.choice(list(_YTID_ALPHABET), size=11))
        # Make the first clips cover every class on its own so tiny sets stay learnable.
        if i < num_classes_used:
            chosen = [i]
        else:
            count = int(rng.integers(1, max_labels + 1))
            chosen = sorted(rng.choice(num_classes_used, size=count, replace=False).tolist())
        wave = 0.01 * rng.standard_normal(n)
        for k in chosen:
            length = int(n * rng.uniform(0.5, 1.0))
            onset = int(rng.integers(0, n - length + 1))
            event = _pattern(k, length, sample_rate, rng) * rng.uniform(0.15, 0.3)
            wave[onset : onset + length] += event
        start = float(rng.integers(0, 30)) * 10.0
        path = audio_dir / f"{ytid}_{int(start)}.{fmt}"
        sf.write(path, wave.astype(np.float32), sample_rate)
        clips.append(
            SynthClip(ytid, start, start + duration_s, tuple(mids[k] for k in chosen), path)
        )

    segments_csv = Path(out_dir) / f"{split}_segments.csv"
    with open(segments_csv, "w") as f:
        f.write("# Segments csv created by cmkd_scale.synth\n")
        f.write(f"# num_ytids={num_clips}, num_segs={num_clips}, ")
        f.write(f"num_unique_labels={num_classes_used}, ")
        f.write(f"num_positive_labels={sum(len(c.mids) for c in clips)}\n")
        f.write("# YTID, start_seconds, end_seconds, positive_labels\n")
        for c in clips:
            f.write(f'{c.ytid}, {c.start:.3f}, {c.end:.3f}, "{",".join(c.mids)}"\n')
    return SynthDataset(segments_csv, class_labels_csv, audio_dir, tuple(clips), mids)


def make_synthetic_shards(
    out: Path,
    *,
    num_clips: int,
    raw_dir: Path | None = None,
    duration_s: float = 1.5,
    seed: int = 0,
    split: str = "train",
    num_classes_used: int = 8,
    class_labels_csv: Path | None = None,
    shard_size: int | None = None,
    workers: int = 1,
) -> Path:
    """``num_clips`` synthetic clips (written to ``raw_dir``, default ``out``'s sibling
    ``raw_<name>``) through the real prep into the shard set ``out``; returns ``out``."""
    from cmkd_scale.prep import PrepConfig, run_prep

    out = Path(out)
    ds = make_synthetic_audioset(
        raw_dir or out.parent / f"raw_{out.name}",
        num_clips=num_clips,
        num_classes_used=num_classes_used,
        duration_s=duration_s,
        seed=seed,
        split=split,
        class_labels_csv=class_labels_csv,
    )
    sizes = {"shard_size": shard_size} if shard_size else {}
    run_prep(
        PrepConfig(
            segments=(ds.segments_csv,),
            class_labels=ds.class_labels_csv,
            audio_dir=ds.audio_dir,
            out=str(out),
            workers=workers,
            **sizes,
        )
    )
    return out

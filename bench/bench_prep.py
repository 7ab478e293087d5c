"""Prep throughput: clips/s per core on 10 s clips from WAV and MP3 sources, one worker.

Sources are generated like YouTube downloads: 44.1 kHz stereo WAV and 32 kHz mono MP3.
For each source the full ``run_prep`` (locate, decode, cut, downmix, resample, FLAC encode,
re-decode check, tar + idx + sha256, manifest) runs in this process with one worker, and is
compared with the reference way of AST's recipe in the same run: decode, resample to 16 kHz,
write one 16 kHz WAV per clip (no shards, no validation).  Also prints a per-stage profile.
"Per core" is clips per CPU-second (prep and its decoder process; the reference's torch on
one thread) at steady state: prep runs on the first ``SMALL`` clips and on all of them (each
``REPEATS`` times, the cheapest run counts), and the difference gives the cost per clip; what
is left is the fixed start cost of a prep run (starting the decoder process, the plan, the
manifest), reported apart. Wall-clock clips/s equals CPU clips/s only on an idle machine, so
the JSON records the load average too.

    .venv/bin/python bench/bench_prep.py [--clips 200] [--out bench/results/prep.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as taf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cmkd_scale.demo.synth import bundled_class_labels  # noqa: E402
from cmkd_scale.prep import run_prep  # noqa: E402
from cmkd_scale.prep.audio_io import (  # noqa: E402
    check_flac,
    decode_segment,
    encode_flac,
    to_mono_16k,
    to_pcm16,
)

SOURCES = {"wav": (44100, 2), "mp3": (32000, 1)}  # format -> (rate, channels)
CLIP_S = 10.0
TARGET = 40.0


def make_sources(folder: Path, fmt: str, num_clips: int) -> Path:
    """``num_clips`` distinct 10 s noisy chords in ``fmt`` plus a Google-format segment CSV."""
    sr, channels = SOURCES[fmt]
    rng = np.random.default_rng(0)
    t = np.arange(int(CLIP_S * sr)) / sr
    audio = folder / "audio"
    audio.mkdir(parents=True)
    rows = []
    for i in range(num_clips):
        f0 = 110.0 * 2 ** (i % 24 / 12)
        wave = 0.3 * np.sin(2 * np.pi * f0 * t) + 0.1 * np.sin(2 * np.pi * 3 * f0 * t)
        wave = wave[:, None] + 0.05 * rng.standard_normal((len(t), channels))
        ytid = f"bench{i:06d}"
        sf.write(
            audio / f"{ytid}.{fmt}",
            wave.astype(np.float32),
            sr,
            **({"format": "MP3"} if fmt == "mp3" else {}),
        )
        rows.append(f'{ytid}, 0.000, {CLIP_S:.3f}, "/m/09x0r"')
    csv_path = folder / "segments.csv"
    csv_path.write_text(
        "# bench\n# bench\n# YTID, start_seconds, end_seconds, positive_labels\n"
        + "\n".join(rows)
        + "\n"
    )
    return csv_path


def cpu_seconds() -> float:
    """CPU seconds of this process and of its reaped children (prep decodes in spawned
    decoder processes, which it ends and waits for before returning)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn, *args, **kwargs) -> tuple[object, float, float]:
    """(result, wall seconds, CPU seconds of this process and its children)."""
    w0, c0 = time.perf_counter(), cpu_seconds()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - w0, cpu_seconds() - c0


def reference_way(audio_dir: Path, out: Path) -> int:
    """AST recipe style: per clip decode, resample to 16 kHz, write a 16 kHz WAV file."""
    out.mkdir()
    n = 0
    for path in sorted(audio_dir.iterdir()):
        wave, sr = sf.read(path, dtype="float32", always_2d=True)
        mono = torch.from_numpy(np.ascontiguousarray(wave.mean(axis=1)))
        sf.write(out / f"{path.stem}.wav", taf.resample(mono, sr, 16000).numpy(), 16000)
        n += 1
    return n


def stage_profile(audio_dir: Path, num: int = 20) -> dict[str, float]:
    """Mean CPU milliseconds per clip of each stage of process_clip (robust to a busy machine)."""
    stages = {"decode": 0.0, "resample": 0.0, "encode_flac": 0.0, "check_flac": 0.0}
    paths = sorted(audio_dir.iterdir())[:num]
    for path in paths:
        t0 = time.thread_time()
        audio, sr = decode_segment(str(path), 0.0, CLIP_S)
        t1 = time.thread_time()
        pcm = to_pcm16(to_mono_16k(audio, sr))
        t2 = time.thread_time()
        flac = encode_flac(pcm)
        t3 = time.thread_time()
        check_flac(flac, pcm)
        t4 = time.thread_time()
        for name, dt in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            stages[name] += dt * 1000 / len(paths)
    return {k: round(v, 2) for k, v in stages.items()}


SMALL = 10  # clips of the short prep run that measures the fixed start cost
REPEATS = 3  # runs of each size; the cheapest counts (other jobs only ever add CPU time)


def subset_csv(csv_path: Path, num_clips: int) -> Path:
    """The segment CSV's three header lines and its first ``num_clips`` rows."""
    lines = csv_path.read_text().splitlines(keepends=True)
    small = csv_path.with_name(f"{csv_path.stem}_first{num_clips}.csv")
    small.write_text("".join(lines[: 3 + num_clips]))
    return small


def bench_source(fmt: str, num_clips: int, work: Path) -> dict:
    folder = work / fmt
    csv_path = make_sources(folder, fmt, num_clips)
    torch.set_num_threads(1)  # one core: the reference gets the same budget as prep's worker
    profile = stage_profile(folder / "audio")

    def prep(csv: Path, out: str) -> dict:
        return run_prep(
            [csv], bundled_class_labels(), folder / "audio", str(folder / out), workers=1,
            progress_every_s=1e9,
        )  # fmt: skip

    # each run REPEATS times, the cheapest counts: the start cost (a spawned interpreter, the
    # plan, the manifest) varies from run to run on a shared machine
    small = [timed(prep, subset_csv(csv_path, SMALL), f"shards_small{i}") for i in range(REPEATS)]
    full = [timed(prep, csv_path, f"shards{i}") for i in range(REPEATS)]
    _, small_wall, small_cpu = min(small, key=lambda r: r[2])
    manifest, wall, cpu = min(full, key=lambda r: r[2])
    assert manifest["num_samples"] == num_clips, manifest["num_failed"]
    n_ref, ref_wall, ref_cpu = timed(reference_way, folder / "audio", folder / "reference")
    shard_bytes = sum(s["bytes"] for s in manifest["shards"])
    cpu_per_clip = (cpu - small_cpu) / (num_clips - SMALL)  # steady state
    wall_per_clip = (wall - small_wall) / (num_clips - SMALL)
    per_cpu_s, per_s = 1 / cpu_per_clip, 1 / wall_per_clip
    return {
        "source": f"{fmt} {SOURCES[fmt][0]} Hz x {SOURCES[fmt][1]} ch, {CLIP_S:.0f} s clips",
        "clips": num_clips,
        "prep_wall_s": round(wall, 3),
        "prep_cpu_s": round(cpu, 3),
        "prep_start_cpu_s": round(small_cpu - SMALL * cpu_per_clip, 2),
        "prep_start_wall_s": round(small_wall - SMALL * wall_per_clip, 2),
        "prep_clips_per_s": round(per_s, 1),
        "prep_clips_per_cpu_s": round(per_cpu_s, 1),
        "prep_clips_per_cpu_s_whole_run": round(num_clips / cpu, 1),
        "reference_clips_per_s": round(n_ref / ref_wall, 1),
        "reference_clips_per_cpu_s": round(n_ref / ref_cpu, 1),
        "ratio_prep_over_reference_wall": round(per_s / (n_ref / ref_wall), 3),
        "ratio_prep_over_reference_cpu": round(per_cpu_s / (n_ref / ref_cpu), 3),
        "stage_ms_per_clip": profile,
        "shard_mb_per_clip": round(shard_bytes / num_clips / 1e6, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=200)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "prep.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_prep_"))
    try:
        results = [bench_source(fmt, args.clips, work) for fmt in SOURCES]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "bench": "prep",
        "target_clips_per_s_per_core": TARGET,
        "workers": 1,
        "machine": {
            "cpu_count_visible": len(os.sched_getaffinity(0)),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_avg_1m": round(os.getloadavg()[0], 2),
        },
        "results": results,
    }
    for r in results:
        print(
            f"{r['source']}: prep {r['prep_clips_per_s']} clips/s on 1 core "
            f"({r['prep_clips_per_cpu_s']} per CPU-second at steady state, target {TARGET}; "
            f"fixed start {r['prep_start_cpu_s']} CPU-s per prep run); reference way "
            f"{r['reference_clips_per_s']} clips/s ({r['reference_clips_per_cpu_s']} per "
            f"CPU-second); ratio wall {r['ratio_prep_over_reference_wall']}, "
            f"CPU {r['ratio_prep_over_reference_cpu']}; "
            f"stages ms/clip {r['stage_ms_per_clip']}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

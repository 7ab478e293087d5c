"""One segment's unit of work: audio file -> validated 16 kHz mono FLAC bytes (runs in workers)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .audio_io import (
    SAMPLE_RATE,
    DecodeError,
    check_flac,
    decode_segment,
    encode_flac,
    to_mono_16k,
    to_pcm16,
)


@dataclass(frozen=True, slots=True)
class ClipJob:
    position: int  # index of the segment in the global segment list
    path: str
    start: float
    end: float


@dataclass(frozen=True, slots=True)
class ClipResult:
    position: int
    flac: bytes | None  # None when the clip failed
    duration: float
    error: str | None


def process_clip(job: ClipJob) -> ClipResult:
    """Decode, cut, downmix, resample, encode and re-decode one clip; never raises on bad audio."""
    try:
        audio, sr = decode_segment(job.path, job.start, job.end)
        if audio.size == 0:
            raise DecodeError("no audio frames in the segment")
        if not np.isfinite(audio).all():
            raise DecodeError("decoded samples contain NaN or inf")
        pcm = to_pcm16(to_mono_16k(audio, sr))
        if len(pcm) == 0:
            raise DecodeError("segment is shorter than one sample at 16 kHz")
        flac = encode_flac(pcm)
        check_flac(flac, pcm)
    except DecodeError as exc:
        return ClipResult(job.position, None, 0.0, str(exc))
    return ClipResult(job.position, flac, len(pcm) / SAMPLE_RATE, None)


def init_worker() -> None:
    """Pool initializer: one torch thread per worker process (workers are the parallelism)."""
    import torch

    torch.set_num_threads(1)

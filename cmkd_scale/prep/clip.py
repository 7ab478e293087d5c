"""One segment's unit of work: audio file -> validated 16 kHz mono FLAC bytes (runs in workers)."""

from __future__ import annotations

import os
import resource
import signal
import time
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

# Fault injection for tests, never set in production: with CMKD_PREP_CRASH_ON=<substring>, a
# decoder process kills itself with CMKD_PREP_CRASH_SIGNAL (default SIGSEGV) before decoding a
# file whose name contains the substring, as a crashing native decoder would (HANG: it sleeps
# forever instead, as a decoder stuck in a loop would).  With
# CMKD_PREP_CRASH_ONCE=<marker path> it does so only while that marker file does not exist yet
# (the crash creates it): a one-off kill, after which the same file decodes fine.
CRASH_ON_ENV = "CMKD_PREP_CRASH_ON"
CRASH_SIGNAL_ENV = "CMKD_PREP_CRASH_SIGNAL"
CRASH_ONCE_ENV = "CMKD_PREP_CRASH_ONCE"
_in_decoder_process = False  # set by init_worker: the hook never fires in the caller's process


def _injected_crash(path: str) -> None:
    """The test-only fault injection described above (a no-op unless its variable is set)."""
    needle = os.environ.get(CRASH_ON_ENV)
    if not (_in_decoder_process and needle and needle in os.path.basename(path)):
        return
    if once := os.environ.get(CRASH_ONCE_ENV):
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    if os.environ.get(CRASH_SIGNAL_ENV) == "HANG":
        while True:
            time.sleep(3600)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # an injected crash leaves no core file
    os.kill(os.getpid(), signal.Signals[os.environ.get(CRASH_SIGNAL_ENV, "SIGSEGV")])


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
    _injected_crash(job.path)
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
    """Decoder process setup (nothing here imports torch: a decoder process stays small)."""
    global _in_decoder_process
    _in_decoder_process = True

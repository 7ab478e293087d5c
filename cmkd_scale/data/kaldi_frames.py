"""Fused CPU kernels: AST's waveform mixup + Kaldi's framing, DC removal, pre-emphasis, window.

DALI runs these per sample in its CPU thread pool (``NumbaFunction``, see
``pipeline.fused_fbank``); ``fn.power_spectrum`` takes the frames from there. Two vectorised
passes replace what the DALI-op graph does in a dozen (mixup's mean, pad and blend; three framing
phases, their offsets, the spectrogram's window extraction): on a CPU those passes cost more
than the FFTs.

Kaldi (``torchaudio.compliance.kaldi``, snip_edges) with AST's settings: frame t is samples
[160 t, 160 t + 400) of x; its mean m is removed, then pre-emphasis inside the frame,
y[i] = (x[i] - m) - 0.97 (x[i - 1] - m) for i >= 1 and y[0] = (x[0] - m) - 0.97 (x[0] - m), then
the symmetric Hann window. For i >= 1 that is e[i] - 0.03 m with e = x pre-emphasised once over
the whole wave; y[0] is weighed by the window's 0. So: one pass computes e, then per frame its
mean and ``hann * (e - 0.03 m)``, both vectorised loops.

AST's mixup (``_wav2fbank``): both waves centred, the partner zero-padded or cut to the primary's
length, ``lam * wave + (1 - lam) * partner``, centred again. The primary's and the blend's
centring are constants over the whole wave, which the per-frame DC removal takes out anyway;
only the partner's centring matters (it comes before its padding).

This module imports Numba only; DALI stays in ``pipeline.py``.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import types as nt
from numba.core import cgutils
from numba.extending import intrinsic

WINDOW = 400  # samples per frame (25 ms at 16 kHz)
HOP = 160  # 10 ms
PREEMPHASIS = 0.97
HANN = np.hanning(WINDOW).astype(np.float32)  # Kaldi's "hanning": symmetric, HANN[0] == 0
_DC = np.float32(1.0 - PREEMPHASIS)
_EMPHASIS = np.float32(PREEMPHASIS)


@numba.njit(cache=True)
def frame_count(samples: int) -> int:
    """Kaldi's frame count with snip_edges: 1 + (N - 400) // 160, none below one window."""
    if samples < WINDOW:
        return 0
    return 1 + (samples - WINDOW) // HOP


@numba.njit(cache=True, fastmath=True)
def _emphasise(emphasised, wave):
    """e[j] = x[j] - 0.97 x[j - 1] (e[0] is never read: HANN[0] == 0)."""
    emphasised[0] = wave[0]
    for j in range(1, wave.shape[0]):
        emphasised[j] = wave[j] - _EMPHASIS * wave[j - 1]


@numba.njit(cache=True, fastmath=True)
def _write_frames(frames, wave, emphasised):
    """Windowed frames ``[T, 400]`` of ``wave`` (its ``emphasised`` copy given)."""
    for t in range(frames.shape[0]):
        start = t * HOP
        total = np.float32(0.0)
        for i in range(WINDOW):
            total += wave[start + i]
        offset = _DC * total / np.float32(WINDOW)
        frame = frames[t]
        frame[0] = 0.0
        for i in range(1, WINDOW):
            frame[i] = HANN[i] * (emphasised[start + i] - offset)


@numba.njit(cache=True, fastmath=True)
def _mix(mixed, wave, partner, lam):
    """``lam * wave + (1 - lam) * (partner - mean(partner))``, the partner cut or zero-padded."""
    total = np.float32(0.0)
    for j in range(partner.shape[0]):
        total += partner[j]
    partner_mean = total / np.float32(max(partner.shape[0], 1))
    other = np.float32(1.0) - lam
    overlap = min(wave.shape[0], partner.shape[0])
    for j in range(overlap):
        mixed[j] = lam * wave[j] + other * (partner[j] - partner_mean)
    for j in range(overlap, wave.shape[0]):
        mixed[j] = lam * wave[j]


# DALI's NumbaFunction calling convention (nvidia/dali/plugin/numba): the operator gets the
# addresses of two C functions. setup(out_shapes, out_ndims, num_outs, in_shapes, in_ndims,
# num_ins, num_samples) fills each output's shape; run(out_data, out_shapes, out_ndims, num_outs,
# in_data, in_shapes, in_ndims, num_ins) processes one sample. ``*_data`` point to arrays of
# data pointers, ``*_shapes`` to arrays of pointers to int64 shapes ([arg][sample] in setup).
# DALI's plugin builds these wrappers around a Python function at every construction (~5 s of
# Numba compilation per kernel and process); defined here they are compiled once and cached.
# Outputs after the first are scratch waves ([N]) that DALI allocates and nobody reads.
SETUP_SIGNATURE = nt.void(nt.uint64, nt.uint64, nt.int32, nt.uint64, nt.uint64, nt.int32, nt.int32)
RUN_SIGNATURE = nt.void(
    nt.uint64, nt.uint64, nt.uint64, nt.int32, nt.uint64, nt.uint64, nt.uint64, nt.int32
)


@intrinsic
def _pointer(typingctx, address):
    """An integer address as a ``void*`` (what ``numba.carray`` takes)."""

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return nt.voidptr(address), codegen


@numba.njit(cache=True)
def _vector(data, shapes, arg):
    """Argument ``arg`` of one sample as a 1-D float32 array."""
    address = numba.carray(_pointer(data), arg + 1, dtype=np.int64)[arg]
    shape = numba.carray(_pointer(shapes), arg + 1, dtype=np.int64)[arg]
    length = numba.carray(_pointer(shape), 1, dtype=np.int64)[0]
    return numba.carray(_pointer(address), length, dtype=np.float32)


@numba.njit(cache=True)
def _frames(data, shapes):
    """Output 0 of one sample: the ``[T, 400]`` float32 frames."""
    address = numba.carray(_pointer(data), 1, dtype=np.int64)[0]
    shape = numba.carray(_pointer(shapes), 1, dtype=np.int64)[0]
    frames = numba.carray(_pointer(shape), 2, dtype=np.int64)[0]
    return numba.carray(_pointer(address), (frames, WINDOW), dtype=np.float32)


@numba.cfunc(SETUP_SIGNATURE, nopython=True, cache=True)
def frames_setup(out_shapes, out_ndims, num_outs, in_shapes, in_ndims, num_ins, num_samples):
    """Per sample: output 0 ``[T, 400]`` frames of the ``[N]`` wave (input 0); the other
    outputs (scratch) ``[N]``."""
    outs = numba.carray(_pointer(out_shapes), (num_outs, num_samples), dtype=np.int64)
    ins = numba.carray(_pointer(in_shapes), (num_ins, num_samples), dtype=np.int64)
    for sample in range(num_samples):
        samples = numba.carray(_pointer(ins[0, sample]), 1, dtype=np.int64)[0]
        shape = numba.carray(_pointer(outs[0, sample]), 2, dtype=np.int64)
        shape[0] = frame_count(samples)
        shape[1] = WINDOW
        for out in range(1, num_outs):
            numba.carray(_pointer(outs[out, sample]), 1, dtype=np.int64)[0] = samples


@numba.cfunc(RUN_SIGNATURE, nopython=True, cache=True)
def eval_frames(out_data, out_shapes, out_ndims, num_outs, in_data, in_shapes, in_ndims, num_ins):
    """wave -> (frames, scratch: emphasised)."""
    wave = _vector(in_data, in_shapes, 0)
    emphasised = _vector(out_data, out_shapes, 1)
    if wave.shape[0] == 0:
        return
    _emphasise(emphasised, wave)
    _write_frames(_frames(out_data, out_shapes), wave, emphasised)


@numba.cfunc(RUN_SIGNATURE, nopython=True, cache=True)
def mixup_frames(out_data, out_shapes, out_ndims, num_outs, in_data, in_shapes, in_ndims, num_ins):
    """(wave, partner, mix = [lambda, 1 if mixed else 0]) -> (frames, scratch: emphasised,
    scratch: mixed wave)."""
    wave = _vector(in_data, in_shapes, 0)
    mix = _vector(in_data, in_shapes, 2)
    emphasised = _vector(out_data, out_shapes, 1)
    if wave.shape[0] == 0:
        return
    if mix[1] > 0.0:
        mixed = _vector(out_data, out_shapes, 2)
        _mix(mixed, wave, _vector(in_data, in_shapes, 1), mix[0])
        wave = mixed
    _emphasise(emphasised, wave)
    _write_frames(_frames(out_data, out_shapes), wave, emphasised)


def frames_reference(wave: np.ndarray) -> np.ndarray:
    """Kaldi's windowed frames in NumPy (float64) the long way, for tests: ``[T, 400]``."""
    frames = frame_count(len(wave))
    index = np.arange(WINDOW)[None, :] + HOP * np.arange(frames)[:, None]
    x = wave.astype(np.float64)[index]
    x = x - x.mean(axis=1, keepdims=True)
    shifted = np.concatenate([x[:, :1], x[:, :-1]], axis=1)
    return (x - PREEMPHASIS * shifted) * np.hanning(WINDOW)

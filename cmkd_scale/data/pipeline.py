"""The one DALI pipeline: shard members -> AST's Kaldi log-mel fbank (+ AST's augmentation).

This is the only module that imports ``nvidia.dali``. One pipeline definition takes the device:
decoding always runs on CPU threads (DALI's audio decoder is CPU-only); with ``device="gpu"``
every op after decoding (mixup, framing, spectrogram, mel, log, pad/crop, SpecAugment,
normalisation) runs on the GPU; with ``device="cpu"`` the same graph runs with CPU ops and
``device_id=None`` (``device_id=0`` fails to build without a CUDA driver).

Kaldi parity. ``torchaudio.compliance.kaldi.fbank`` (AST's settings) frames the signal (400
samples every 160, edges snipped), removes each frame's mean, pre-emphasises within the frame,
applies a symmetric Hann window, takes the 512-point power spectrum, a 128-band HTK mel bank
(20 Hz..Nyquist) and the natural log floored at float32 eps. DALI's spectrogram cannot remove a
per-frame mean, so the graph frames the wave itself, in one of two ways (``FeatureSpec.framing``):

* fused (the CPU default): one compiled kernel (``kaldi_frames``, DALI's Numba plugin) mixes,
  frames, removes each frame's mean, pre-emphasises and windows; ``fn.power_spectrum`` follows.
  On a CPU, DALI's elementwise ops cost more than the FFTs, so this is what makes the CPU
  loader cheap (bench/bench_loader.py).
* ops (the GPU graph): DALI ops only, see ``kaldi_fbank``; a Numba GPU kernel is untried (the
  plugin accepts CUDA 11/12 toolkits only; this DALI is built for CUDA 13). It runs on the CPU
  too, so the tests check both graphs against Kaldi; it is also the CPU fallback without Numba.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import feed_ndarray

from cmkd_scale import SAMPLE_RATE
from cmkd_scale.data.source import SourceBatch

log = logging.getLogger(__name__)

WINDOW = 400  # 25 ms
HOP = 160  # 10 ms
NFFT = 512  # Kaldi pads the window to the next power of two
PREEMPHASIS = 0.97
LOG_FLOOR = math.log(float(np.finfo(np.float32).eps))  # Kaldi's log(max(x, eps))
HANN = np.hanning(WINDOW).astype(np.float32).tolist()  # symmetric, as Kaldi's "hanning"

FRAMINGS = ("auto", "fused", "ops")  # FeatureSpec.framing
_DALI_TYPES = {np.uint8: types.UINT8, np.float32: types.FLOAT, np.int64: types.INT64}


@dataclass(frozen=True, kw_only=True)
class FeatureSpec:
    """What the graph computes after decoding."""

    num_mel_bins: int = 128
    target_length: int | None = 1024  # None: keep every frame (no pad/crop)
    normalize: bool = True  # (x - mean) / (2 * std), AST's input normalisation
    norm_mean: float = 0.0
    norm_std: float = 0.5
    augment: bool = False  # mixup + SpecAugment, parameters fed by the sampler
    # Stop after decoding (benchmarks: the CPU share of the GPU pipeline); run() then hands
    # out no features, only labels and extras.
    decode_only: bool = False
    # How the graph frames the wave: "fused" (a compiled kernel, CPU only), "ops" (DALI ops
    # only, the GPU graph; also runs on the CPU, so tests check it), "auto" (fused on CPU).
    framing: str = "auto"

    def __post_init__(self) -> None:
        if self.framing not in FRAMINGS:
            raise ValueError(f"framing must be one of {FRAMINGS}, got {self.framing!r}")

    def fused(self, device: str) -> bool:
        """Whether the graph on ``device`` frames with the compiled kernel."""
        if self.framing == "fused" and device == "gpu":
            raise ValueError("framing 'fused' is a CPU kernel: use 'auto' or 'ops' on the GPU")
        if self.framing != "auto":
            return self.framing == "fused"
        return device == "cpu" and numba_available()


@functools.cache
def numba_available() -> bool:
    """Numba is a dependency, but a hand-made environment (e.g. the GPU check's wheels) may
    lack it: the CPU graph then falls back to DALI ops (slower, same features)."""
    if importlib.util.find_spec("numba") is None:
        log.warning("numba is not installed: the CPU loader frames with DALI ops (slower)")
        return False
    return True


def kaldi_fbank(wave, length, num_mel_bins: int, *, scale: float = 1.0, shift: float = 0.0):
    """``scale * log-mel + shift`` per Kaldi (``[frames, num_mel_bins]``) of a 1-D float wave.

    ``length`` is the wave's sample count (a CPU node). Kaldi's per-frame DC removal followed
    by its in-frame pre-emphasis equals the whole wave pre-emphasised once minus
    ``(1 - 0.97) * frame mean`` in every frame (the first sample of a frame differs, but the
    symmetric Hann window weighs it 0). Frames overlap (400 every 160), so no single signal
    carries every frame's own offset; every third frame does not overlap the next one though:
    frames t = 3k + phase start at 160 * phase + 480 k and end 80 samples before the next. Per
    phase the emphasised wave is cut from 160 * phase into rows of 480, the row's frame offset
    subtracted (broadcast), and ``fn.spectrogram`` reads 400 of every 480 samples. The three
    phases' mel frames are interleaved back into time order. Frame means come from sums of
    half rows (80 samples; a frame is 5 of them). This costs three contiguous copies of the
    wave instead of materialising ``[T, 400]`` overlapping frames.
    """
    frames = (length - WINDOW) // HOP + 1  # snip_edges: T = 1 + (N - 400) // 160
    per_phase = (frames + 2) // 3  # K frames per phase; the last may lie beyond T (dropped)
    emphasised = fn.preemphasis_filter(wave, preemph_coeff=PREEMPHASIS)
    halves = fn.slice(
        wave, start=[0], shape=(frames + 2) * HOP, axes=[0], out_of_bounds_policy="pad"
    )
    halves = fn.reductions.sum(fn.reshape(halves, shape=[-1, 2, HOP // 2]), axes=[2])  # [T+2, 2]
    rows = fn.reductions.sum(halves, axes=[1])  # [T+2] sums of 160-sample rows
    offset = (rows[:-2] + rows[1:-1] + halves[2:, 0]) * ((1.0 - PREEMPHASIS) / WINDOW)
    offset = fn.slice(offset, start=[0], shape=3 * per_phase, axes=[0], out_of_bounds_policy="pad")
    offset = fn.reshape(offset, shape=[-1, 3])  # [K, 3]: frame 3k + phase at [k, phase]
    mels = []
    for phase in range(3):
        chunk = fn.slice(
            emphasised,
            start=[phase * HOP],
            shape=3 * HOP * per_phase,
            axes=[0],
            out_of_bounds_policy="pad",
        )
        chunk = fn.reshape(chunk, shape=[-1, 3 * HOP]) - offset[:, phase : phase + 1]
        spectrum = fn.spectrogram(
            fn.reshape(chunk, shape=[-1]),
            nfft=NFFT,
            window_length=WINDOW,
            window_step=3 * HOP,
            window_fn=HANN,
            center_windows=False,
            power=2,
            layout="tf",
        )
        mels.append(_mel(spectrum, num_mel_bins))
    mel = fn.reshape(fn.stack(*mels, axis=1), shape=[-1, num_mel_bins])  # [3K, bins]
    return _log(fn.slice(mel, start=[0], shape=frames, axes=[0]), scale, shift)


def fused_fbank(wave, num_mel_bins: int, *, scale: float, shift: float, partner=None, mix=None):
    """The CPU graph: one compiled kernel (``kaldi_frames``) mixes, frames, removes each
    frame's mean, pre-emphasises and windows; then ``fn.power_spectrum`` (no spectrogram: the
    window is applied), and mel and log as in ``kaldi_fbank``."""
    inputs = (wave, partner, mix) if partner is not None else (wave,)
    frames, *_scratch = _frames_op(len(inputs))(*inputs)
    # [T, 257] power of the zero-padded 512-point FFT of every frame
    spectrum = fn.reshape(fn.power_spectrum(frames, nfft=NFFT, axis=1), layout="tf")
    return _log(_mel(spectrum, num_mel_bins), scale, shift)


@functools.cache
def _frames_op(inputs: int):
    """The kernel (1 input: eval, 3: mixup) as a DALI CPU op: ``NumbaFunction`` given
    kaldi_frames' compiled C functions, loaded from Numba's cache instead of compiled per
    process. Outputs: the frames, then one or two scratch waves."""
    from nvidia.dali.plugin.numba import NumbaFunction  # numba is needed on the CPU path only

    from cmkd_scale.data import kaldi_frames

    class CompiledKernel(NumbaFunction):
        def _get_run_fn_cpu(self, run_fn, *_):
            return run_fn.address

        def _get_setup_fn_cpu(self, setup_fn):
            return setup_fn.address

    outputs = 2 if inputs == 1 else 3
    return CompiledKernel(
        run_fn=kaldi_frames.eval_frames if inputs == 1 else kaldi_frames.mixup_frames,
        setup_fn=kaldi_frames.frames_setup,
        out_types=[types.FLOAT] * outputs,
        in_types=[types.FLOAT] * inputs,
        outs_ndim=[2] + [1] * (outputs - 1),
        ins_ndim=[1] * inputs,
        device="cpu",
    )


def _mel(spectrum, num_mel_bins: int):
    return fn.mel_filter_bank(
        spectrum,
        nfilter=num_mel_bins,
        sample_rate=SAMPLE_RATE,
        freq_low=20.0,
        freq_high=SAMPLE_RATE / 2,
        mel_formula="htk",
        normalize=False,
    )


def _log(mel, scale: float, shift: float):
    """``scale * ln(max(mel, eps)) + shift``."""
    # = M log10(max(x / r, eps / r)), M = scale ln 10, r = exp(-shift / scale)
    multiplier = scale * math.log(10.0)
    reference = math.exp(-shift / scale)
    return fn.to_decibels(
        mel,
        multiplier=multiplier,
        reference=reference,
        cutoff_db=multiplier * math.log10(float(np.finfo(np.float32).eps) / reference),
    )


def ast_mixup(wave, length, partner, mix):
    """AST's waveform mixup up to a constant: partner mean-removed, zero-padded/cut, blended.

    AST also removes the primary clip's mean and the blend's mean; a constant offset of the
    whole wave does not change Kaldi's fbank (every frame's mean is removed), so those two
    passes are left out. The partner's mean must go before its zero padding.
    """
    lam = mix[0]
    partner = partner - fn.reductions.mean(partner)
    partner = fn.slice(partner, start=[0], shape=length, axes=[0], out_of_bounds_policy="pad")
    return lam * wave + (1.0 - lam) * partner


def _decode(encoded):
    wave, _ = fn.decoders.audio(
        encoded, dtype=types.FLOAT, downmix=True, sample_rate=SAMPLE_RATE, quality=50.0
    )
    return wave


@pipeline_def
def audio_pipeline(
    *,
    spec: FeatureSpec,
    device: str,
    source: Callable[[], SourceBatch] | None = None,
    tar_paths: list[str] | None = None,
    index_paths: list[str] | None = None,
    shard_id: int = 0,
    num_shards: int = 1,
):
    """Sampled inputs (``source``: a callable returning the next ``SourceBatch``, training) or
    ``readers.webdataset`` (eval/features)."""
    if source is not None:  # a SourceBatch per call; its fields become named graph inputs
        names = SourceBatch.fields()
        inputs = dict(
            zip(
                names,
                fn.external_source(
                    source=lambda: source().arrays(),
                    num_outputs=len(names),
                    batch=True,
                    dtype=[_DALI_TYPES[SourceBatch.DTYPES[name]] for name in names],
                ),
                strict=True,
            )
        )
        audio, partner, mix = inputs["audio"], inputs["partner"], inputs["mix"]
        anchor, shape = inputs["erase_anchor"], inputs["erase_shape"]
        extra = (inputs["labels"], inputs["index"], mix)
    else:
        audio, labels = fn.readers.webdataset(
            paths=tar_paths,
            index_paths=index_paths,
            ext=["flac", "labels"],
            dtypes=[types.UINT8, types.FLOAT],
            missing_component_behavior="error",
            shard_id=shard_id,
            num_shards=num_shards,
            pad_last_batch=True,
            stick_to_shard=True,  # a kept pipeline reads the same part again next pass
            random_shuffle=False,
            name="reader",
        )
        extra = (labels, fn.get_property(audio, key="source_info"))
    wave = _decode(audio)
    if spec.decode_only:
        return (wave, *extra, *([_decode(partner)] if spec.augment else []))
    # AST removes the clip mean first; Kaldi's per-frame DC removal makes that a no-op.
    # Normalisation (x - mean) / (2 std) is folded into the log; padding rows and masks get
    # the normalised value of a raw 0 (AST pads with zeros and masks with zeros pre-norm).
    scale, shift = 1.0, 0.0
    if spec.normalize:
        scale, shift = 1.0 / (2.0 * spec.norm_std), -spec.norm_mean / (2.0 * spec.norm_std)
    if spec.fused(device):
        mixing = dict(partner=_decode(partner), mix=mix) if spec.augment else {}
        fbank = fused_fbank(wave, spec.num_mel_bins, scale=scale, shift=shift, **mixing)
    else:
        # [N] as an int32 CPU node: slice shapes are (CPU) argument inputs of that type.
        length = fn.cast(wave.shape(), dtype=types.INT32)
        if device == "gpu":
            wave = wave.gpu()
        if spec.augment:
            other = _decode(partner)
            if device == "gpu":
                other, mix = other.gpu(), mix.gpu()
            wave = ast_mixup(wave, length, other, mix)
        fbank = kaldi_fbank(wave, length, spec.num_mel_bins, scale=scale, shift=shift)
    if spec.target_length is not None:  # AST: zero rows appended (raw log-mel 0) / crop
        fbank = fn.slice(
            fbank,
            start=[0],
            shape=[spec.target_length],
            axes=[0],
            out_of_bounds_policy="pad",
            fill_values=shift,
        )
    if spec.augment:  # frequency mask then time mask, zero-filled before normalising
        fbank = fn.erase(fbank, anchor=anchor, shape=shape, axes=[0, 1], fill_value=shift)
    return (fbank, *extra)


class DaliRunner:
    """Builds one pipeline and returns each batch as torch tensors (on the pipeline's device)."""

    def __init__(
        self,
        *,
        spec: FeatureSpec,
        device: str,
        batch_size: int,
        num_threads: int,
        prefetch: int = 2,
        source: Callable[[], SourceBatch] | None = None,
        tar_paths: list[str] | None = None,
        index_paths: list[str] | None = None,
        shard_id: int = 0,
        num_shards: int = 1,
    ) -> None:
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
        if device == "gpu" and not torch.cuda.is_available():
            raise RuntimeError("device 'gpu' asked for but torch sees no CUDA GPU: use 'cpu'")
        self.device = device
        self.spec = spec
        self.batch_size = batch_size
        self.pipe: Pipeline = audio_pipeline(
            spec=spec,
            device=device,
            source=source,
            tar_paths=tar_paths,
            index_paths=index_paths,
            shard_id=shard_id,
            num_shards=num_shards,
            batch_size=batch_size,
            num_threads=num_threads,
            device_id=torch.cuda.current_device() if device == "gpu" else None,
            prefetch_queue_depth=prefetch,
            # the dynamic executor hands out outputs it never recycles: the CPU path wraps
            # them in torch tensors without a copy (``_to_torch``)
            exec_dynamic=True,
        )
        self.pipe.build()

    def epoch_size(self) -> int:
        """Samples this shard of the reader covers (``readers.webdataset`` mode only)."""
        meta = self.pipe.reader_meta("reader")
        return int(meta["epoch_size"])

    def batches_per_epoch(self) -> int:
        """Batches of the reader's epoch on this shard: every shard is padded to the largest
        one (``pad_last_batch``), so a shard may end with batches of its last sample."""
        meta = self.pipe.reader_meta("reader")
        per_shard = math.ceil(meta["epoch_size_padded"] / meta["number_of_shards"])
        return math.ceil(per_shard / self.batch_size)

    def run(self) -> tuple[torch.Tensor | list[np.ndarray], torch.Tensor, list[list[np.ndarray]]]:
        """One batch: features (a tensor, or per-sample arrays if not padded), labels, extras.

        Extras, per sample: sampled inputs give ``index`` ([primary, partner]) and ``mix``
        ([lambda, mixed]); the reader gives ``source_info`` (``path:offset:member``, uint8).
        """
        fbank, labels, *extras = self.pipe.run()
        if self.spec.decode_only:
            return [], _to_torch(labels, "cpu"), []
        if self.spec.target_length is None:
            feats: torch.Tensor | list[np.ndarray] = [np.array(t) for t in _to_cpu(fbank)]
        else:
            feats = _to_torch(fbank, self.device)
        arrays = [[np.array(t) for t in extra] for extra in extras]
        return feats, _to_torch(labels, "cpu"), arrays

    def at_epoch_end(self) -> bool:
        """No batch is scheduled that was not handed out (the runner can start a new epoch)."""
        return self.pipe.empty()

    def rewind(self) -> None:
        """After the source signalled its end (StopIteration), accept a new epoch."""
        self.pipe.reset()

    def close(self) -> None:
        del self.pipe


def _to_cpu(tensor_list):
    return tensor_list.as_cpu() if hasattr(tensor_list, "as_cpu") else tensor_list


def _to_torch(tensor_list, device: str) -> torch.Tensor:
    """A dense DALI batch as a torch tensor on ``device``: shared on the CPU (DLPack; the
    dynamic executor does not reuse output buffers), copied on the GPU on torch's stream."""
    dense = tensor_list.as_tensor()
    if device != "gpu":
        return torch.from_dlpack(dense)
    dtype = {
        types.FLOAT: torch.float32,
        types.INT64: torch.int64,
        types.UINT8: torch.uint8,
    }[dense.dtype]
    out = torch.empty(dense.shape(), dtype=dtype, device=torch.cuda.current_device())
    feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream())
    return out

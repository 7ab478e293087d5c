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
per-frame mean, so the graph builds the frames itself: the wave is cut into rows of 160 samples
(``[R, 160]``); frame t is row t ++ row t+1 ++ the first 80 samples of row t+2 (``[T, 400]``,
three slices and a concatenation); the per-frame mean is subtracted, pre-emphasis applied with
Kaldi's border rule (y[0] = x[0] - 0.97 x[0]) and the frames, laid end to end, go through
``fn.spectrogram`` with window_length = window_step = 400. Every op used exists on the GPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import feed_ndarray

SAMPLE_RATE = 16000
WINDOW = 400  # 25 ms
HOP = 160  # 10 ms
NFFT = 512  # Kaldi pads the window to the next power of two
PREEMPHASIS = 0.97
LOG_FLOOR = math.log(float(np.finfo(np.float32).eps))  # Kaldi's log(max(x, eps))
HANN = np.hanning(WINDOW).astype(np.float32).tolist()  # symmetric, as Kaldi's "hanning"

# Layout of the arrays the training source feeds per sample (see ``sampled_inputs``).
SAMPLED_OUTPUTS = ("audio", "partner", "mix", "erase_anchor", "erase_shape", "labels", "index")


@dataclass(frozen=True, kw_only=True)
class FeatureSpec:
    """What the graph computes after decoding."""

    num_mel_bins: int = 128
    target_length: int | None = 1024  # None: keep every frame (no pad/crop)
    normalize: bool = True  # (x - mean) / (2 * std), AST's input normalisation
    norm_mean: float = 0.0
    norm_std: float = 0.5
    augment: bool = False  # mixup + SpecAugment, parameters fed by the sampler


def kaldi_fbank(wave, length, num_mel_bins: int):
    """Kaldi fbank of a 1-D float wave; ``length`` is its sample count (a CPU node)."""
    frames_count = (length - WINDOW) // HOP + 1  # snip_edges: T = 1 + (N - 400) // 160
    rows_total = (frames_count + 2) * HOP  # never beyond the wave except unused tail
    padded = fn.slice(wave, start=[0], shape=rows_total, axes=[0], out_of_bounds_policy="pad")
    rows = fn.reshape(padded, shape=[-1, HOP])
    frames = fn.cat(rows[:-2], rows[1:-1], rows[2:, : WINDOW - 2 * HOP], axis=1)
    frames = frames - fn.reductions.mean(frames, axes=[1], keep_dims=True)
    emphasised = fn.cat(
        frames[:, 0:1] * (1.0 - PREEMPHASIS),
        frames[:, 1:] - PREEMPHASIS * frames[:, :-1],
        axis=1,
    )
    spectrum = fn.spectrogram(
        fn.reshape(emphasised, shape=[-1]),
        nfft=NFFT,
        window_length=WINDOW,
        window_step=WINDOW,
        window_fn=HANN,
        center_windows=False,
        power=2,
        layout="tf",
    )
    mel = fn.mel_filter_bank(
        spectrum,
        nfilter=num_mel_bins,
        sample_rate=SAMPLE_RATE,
        freq_low=20.0,
        freq_high=SAMPLE_RATE / 2,
        mel_formula="htk",
        normalize=False,
    )
    return fn.to_decibels(mel, multiplier=math.log(10.0), reference=1.0, cutoff_db=LOG_FLOOR)


def ast_mixup(wave, length, partner, mix):
    """AST's waveform mixup: both mean-removed, partner zero-padded/cut, remixed, re-centred."""
    lam, mixed = mix[0], mix[1]
    wave = wave - fn.reductions.mean(wave)
    partner = partner - fn.reductions.mean(partner)
    partner = fn.slice(partner, start=[0], shape=length, axes=[0], out_of_bounds_policy="pad")
    blend = lam * wave + (1.0 - lam) * partner
    # AST re-centres only mixed clips; unmixed ones (lam = 1, silent partner) stay as they are.
    return blend - mixed * fn.reductions.mean(blend)


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
    source: Callable | None = None,
    tar_paths: list[str] | None = None,
    index_paths: list[str] | None = None,
    shard_id: int = 0,
    num_shards: int = 1,
):
    """Sampled inputs (``source``, training) or ``readers.webdataset`` (eval/features)."""
    if source is not None:
        audio, partner, mix, anchor, shape, labels, index = fn.external_source(
            source=source,
            num_outputs=len(SAMPLED_OUTPUTS),
            batch=True,
            dtype=[types.UINT8] * 2 + [types.FLOAT] * 4 + [types.INT64],
        )
        extra = (labels, index, mix)
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
            random_shuffle=False,
            name="reader",
        )
        extra = (labels, fn.get_property(audio, key="source_info"))
    wave = _decode(audio)
    # [N] as an int32 CPU node: slice shapes are (CPU) argument inputs of that type.
    length = fn.cast(wave.shape(), dtype=types.INT32)
    if device == "gpu":
        wave = wave.gpu()
    if spec.augment:
        other = _decode(partner)
        if device == "gpu":
            other, mix = other.gpu(), mix.gpu()
        wave = ast_mixup(wave, length, other, mix)
    else:
        wave = wave - fn.reductions.mean(wave)
    fbank = kaldi_fbank(wave, length, spec.num_mel_bins)
    if spec.target_length is not None:  # AST: zero rows appended (raw log-mel 0) / crop
        fbank = fn.slice(
            fbank, start=[0], shape=[spec.target_length], axes=[0], out_of_bounds_policy="pad"
        )
    if spec.augment:  # frequency mask then time mask, zero-filled before normalising
        fbank = fn.erase(fbank, anchor=anchor, shape=shape, axes=[0, 1], fill_value=0.0)
    if spec.normalize:
        fbank = (fbank - spec.norm_mean) / (2.0 * spec.norm_std)
    return (fbank, *extra)


def erase_regions(
    freq_mask: np.ndarray, time_mask: np.ndarray, target_length: int, num_mel_bins: int
) -> tuple[np.ndarray, np.ndarray]:
    """fn.erase anchors/shapes for one sample: the frequency band, then the time band."""
    (f0, fw), (t0, tw) = freq_mask, time_mask
    anchor = np.array([0, f0, t0, 0], dtype=np.float32)
    shape = np.array([target_length, fw, tw, num_mel_bins], dtype=np.float32)
    return anchor, shape


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
        source: Callable | None = None,
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
            exec_dynamic=True,
        )
        self.pipe.build()

    def epoch_size(self) -> int:
        """Samples this shard of the reader covers (``readers.webdataset`` mode only)."""
        meta = self.pipe.reader_meta("reader")
        return int(meta["epoch_size"])

    def run(self) -> tuple[torch.Tensor | list[np.ndarray], torch.Tensor, list[list[np.ndarray]]]:
        """One batch: features (a tensor, or per-sample arrays if not padded), labels, extras.

        Extras, per sample: sampled inputs give ``index`` ([primary, partner]) and ``mix``
        ([lambda, mixed]); the reader gives ``source_info`` (``path:offset:member``, uint8).
        """
        fbank, labels, *extras = self.pipe.run()
        if self.spec.target_length is None:
            feats: torch.Tensor | list[np.ndarray] = [np.array(t) for t in _to_cpu(fbank)]
        else:
            feats = _to_torch(fbank, self.device)
        arrays = [[np.array(t) for t in extra] for extra in extras]
        return feats, _to_torch(labels, "cpu"), arrays

    def close(self) -> None:
        del self.pipe


def _to_cpu(tensor_list):
    return tensor_list.as_cpu() if hasattr(tensor_list, "as_cpu") else tensor_list


def _to_torch(tensor_list, device: str) -> torch.Tensor:
    """Copy a dense DALI batch into a new torch tensor on ``device``."""
    dense = tensor_list.as_tensor()
    dtype = {
        types.FLOAT: torch.float32,
        types.INT64: torch.int64,
        types.UINT8: torch.uint8,
    }[dense.dtype]
    if device == "gpu":
        out = torch.empty(dense.shape(), dtype=dtype, device=torch.cuda.current_device())
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream())
    else:
        out = torch.empty(dense.shape(), dtype=dtype)
        feed_ndarray(dense, out)
    return out

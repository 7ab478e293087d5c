"""The reference way: AST's per-clip torch/Kaldi feature code, to test and benchmark against.

Follows ``ast/src/dataloader.py`` (``_wav2fbank`` and ``__getitem__``): decode, remove the
mean, optionally mix with a partner clip, ``torchaudio.compliance.kaldi.fbank``, zero-pad or crop
to ``target_length`` frames, SpecAugment (frequency then time mask, zero fill) and normalise
with ``(x - mean) / (2 * std)``. The functions take the random draws as arguments so tests can
replay the DALI pipeline's exact augmentation; ``ReferenceDataset`` draws them itself like AST.
"""

from __future__ import annotations

import io
import random

import numpy as np
import soundfile as sf
import torch
import torchaudio
from torch.utils.data import Dataset

from cmkd_scale import SAMPLE_RATE
from cmkd_scale.config import DataConfig
from cmkd_scale.data.manifest import ShardSet
from cmkd_scale.data.members import MemberReader


def decode(flac: bytes | np.ndarray) -> torch.Tensor:
    """Decode an encoded clip to a float32 mono wave in [-1, 1] (libsndfile)."""
    data = flac.tobytes() if isinstance(flac, np.ndarray) else flac
    wave, _ = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return torch.from_numpy(wave.mean(axis=1) if wave.shape[1] > 1 else wave[:, 0])


def kaldi_fbank(wave: torch.Tensor, num_mel_bins: int = 128) -> torch.Tensor:
    """AST's fbank call: [frames, num_mel_bins] log-mel of a 16 kHz wave."""
    return torchaudio.compliance.kaldi.fbank(
        wave.reshape(1, -1),
        htk_compat=True,
        sample_frequency=SAMPLE_RATE,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=num_mel_bins,
        dither=0.0,
        frame_shift=10,
    )


def ast_mix(wave: torch.Tensor, partner: torch.Tensor, lam: float) -> torch.Tensor:
    """AST's mixup on waveforms: centre both, pad/cut the partner, mix, centre again."""
    wave = wave - wave.mean()
    partner = partner - partner.mean()
    if partner.numel() < wave.numel():
        partner = torch.nn.functional.pad(partner, (0, wave.numel() - partner.numel()))
    partner = partner[: wave.numel()]
    mixed = lam * wave + (1 - lam) * partner
    return mixed - mixed.mean()


def pad_or_crop(fbank: torch.Tensor, target_length: int) -> torch.Tensor:
    """AST: append zero frames up to target_length, or keep the first target_length."""
    missing = target_length - fbank.shape[0]
    if missing > 0:
        return torch.nn.functional.pad(fbank, (0, 0, 0, missing))
    return fbank[:target_length]


def apply_masks(
    fbank: torch.Tensor, freq_mask: tuple[int, int], time_mask: tuple[int, int]
) -> torch.Tensor:
    """Zero the band of bins [f0, f0+fw) and of frames [t0, t0+tw)."""
    out = fbank.clone()
    (f0, fw), (t0, tw) = freq_mask, time_mask
    out[:, f0 : f0 + fw] = 0.0
    out[t0 : t0 + tw, :] = 0.0
    return out


def ast_features(
    wave: torch.Tensor,
    *,
    target_length: int,
    norm_mean: float,
    norm_std: float,
    num_mel_bins: int = 128,
    partner: torch.Tensor | None = None,
    lam: float = 1.0,
    freq_mask: tuple[int, int] = (0, 0),
    time_mask: tuple[int, int] = (0, 0),
) -> torch.Tensor:
    """One clip through AST's feature code with given augmentation draws."""
    wave = wave - wave.mean() if partner is None else ast_mix(wave, partner, lam)
    fbank = pad_or_crop(kaldi_fbank(wave, num_mel_bins), target_length)
    fbank = apply_masks(fbank, freq_mask, time_mask)
    return (fbank - norm_mean) / (norm_std * 2)


class ReferenceDataset(Dataset):
    """AST's dataloader on our shards: per-item decode + kaldi.fbank + torchaudio SpecAugment."""

    def __init__(self, url: str, cfg: DataConfig, *, train: bool) -> None:
        self.cfg = cfg
        self.train = train
        self.shards = ShardSet(url)
        self.reader: MemberReader | None = None  # opened per worker process

    def __len__(self) -> int:
        return self.shards.num_samples

    def _read(self, index: int) -> tuple[torch.Tensor, np.ndarray]:
        if self.reader is None:
            self.reader = MemberReader(self.shards)
        sample = self.reader.read(index)
        return decode(sample.flac), sample.labels

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        wave, labels = self._read(index)
        if self.train and random.random() < cfg.mixup:
            other, other_labels = self._read(random.randint(0, len(self) - 1))
            lam = float(np.random.beta(cfg.mixup_alpha, cfg.mixup_alpha))
            wave = ast_mix(wave, other, lam)
            labels = lam * labels + (1 - lam) * other_labels
        else:
            wave = wave - wave.mean()
        fbank = pad_or_crop(kaldi_fbank(wave, cfg.num_mel_bins), cfg.target_length)
        if self.train:
            fbank = fbank.T  # torchaudio masks act on (freq, time)
            if cfg.freqm:
                fbank = torchaudio.transforms.FrequencyMasking(cfg.freqm)(fbank)
            if cfg.timem:
                fbank = torchaudio.transforms.TimeMasking(cfg.timem)(fbank)
            fbank = fbank.T
        fbank = (fbank - cfg.norm_mean) / (cfg.norm_std * 2)
        return fbank, torch.from_numpy(np.array(labels, dtype=np.float32))  # a writable copy

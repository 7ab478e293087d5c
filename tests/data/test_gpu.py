"""The same pipeline with device="gpu": parity with Kaldi and with the CPU graph."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmkd_scale.config import DataConfig
from cmkd_scale.data import EvalLoader, TrainLoader
from cmkd_scale.data.pipeline import FeatureSpec
from cmkd_scale.data.reference import kaldi_fbank
from tests.fixtures.data import decoded, flac_bytes, run_graph

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
TOLERANCE = 0.05


def test_gpu_graph_matches_kaldi():
    rng = np.random.default_rng(0)
    t = np.arange(160000) / 16000
    waves = [np.clip(0.2 * rng.standard_normal(160000), -1, 1), 0.2 * np.sin(2e3 * t) + 0.3]
    flacs = [flac_bytes(w) for w in waves]
    feats = run_graph(flacs, FeatureSpec(target_length=None, normalize=False), device="gpu")
    for flac, ours in zip(flacs, feats, strict=True):
        ref = kaldi_fbank(torch.from_numpy(decoded(flac))).numpy()
        assert ours.shape == ref.shape == (998, 128)
        assert np.abs(ours - ref).max() <= TOLERANCE


def test_gpu_loaders_equal_cpu_loaders(synth_shards):
    cfg = DataConfig(
        train=str(synth_shards),
        eval=str(synth_shards),
        target_length=160,
        num_threads=1,
        freqm=24,
        timem=40,
    )
    atol = TOLERANCE / (2 * cfg.norm_std)
    kw = dict(micro_batch=3, rank=0, world_size=2)
    cpu = list(TrainLoader(cfg, seed=2, device="cpu", **kw).epoch_batches(0))
    gpu = list(TrainLoader(cfg, seed=2, device="gpu", **kw).epoch_batches(0))
    for a, b in zip(cpu, gpu, strict=True):
        assert b.fbank.is_cuda and b.labels.is_cuda and a.keys == b.keys
        torch.testing.assert_close(b.fbank.cpu(), a.fbank, rtol=0, atol=atol)
        torch.testing.assert_close(b.labels.cpu(), a.labels)
    cpu = list(EvalLoader(cfg, device="cpu", **kw).batches())
    gpu = list(EvalLoader(cfg, device="gpu", **kw).batches())
    for a, b in zip(cpu, gpu, strict=True):
        assert torch.equal(a.index, b.index) and torch.equal(a.valid, b.valid)
        torch.testing.assert_close(b.fbank.cpu(), a.fbank, rtol=0, atol=atol)

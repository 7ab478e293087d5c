"""Normalisation statistics of a shard set, as AST's ``get_norm_stats.py`` computes them.

AST runs its eval-mode dataloader with normalisation skipped (no mixup, no masks, features
padded/cropped to ``target_length``) and reports the mean and std of those raw log-mel values.
AST averages per-batch means and stds; here the sums run over every cell of every clip, which is
the exact value that the batch average approximates (it does not depend on the batch size).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from cmkd_scale.config import DataConfig
from cmkd_scale.data.eval_loader import EvalLoader
from cmkd_scale.data.pipeline import FeatureSpec

log = logging.getLogger(__name__)


def norm_stats(
    url: str, cfg: DataConfig, *, device: str = "auto", micro_batch: int = 8
) -> dict[str, float]:
    """Mean and std of the raw log-mel (after pad/crop) over all clips of a shard set."""
    spec = FeatureSpec(
        num_mel_bins=cfg.num_mel_bins, target_length=cfg.target_length, normalize=False
    )
    loader = EvalLoader(
        dataclasses.replace(cfg, eval=url),
        micro_batch=micro_batch,
        rank=0,
        world_size=1,
        device=device,
        spec=spec,
    )
    total, total_sq, cells, clips = 0.0, 0.0, 0, 0
    try:
        for batch in loader.batches():
            rows = batch.fbank[batch.valid.to(batch.fbank.device)].double()
            total += float(rows.sum())
            total_sq += float((rows * rows).sum())
            cells += rows.numel()
            clips += int(batch.valid.sum())
    finally:
        loader.close()
    mean = total / cells
    std = float(np.sqrt(max(total_sq / cells - mean * mean, 0.0) * cells / max(cells - 1, 1)))
    log.info("%s: %d clips, norm_mean %.7f, norm_std %.7f", url, clips, mean, std)
    return {"norm_mean": mean, "norm_std": std, "clips": clips, "cells": cells}

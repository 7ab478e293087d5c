"""Training and evaluation loaders: shard set -> DALI -> ``Batch`` of torch tensors.

``TrainLoader`` follows the sampler's plans (see sampler.py for why training does not use
``readers.webdataset``): per step, ``source.PlannedSource`` reads the planned members by byte
range, checks them and mixes the labels with the planned lambda, and the resulting
``SourceBatch`` (bytes and augmentation parameters, by name) feeds the DALI pipeline.
``EvalLoader`` (eval_loader.py) reads with DALI's ``readers.webdataset`` (contiguous split per
rank, last batch padded), so every eval clip is produced exactly once across ranks, in global
order.

Tensors: ``fbank`` and ``labels`` are on the pipeline's device (CUDA for ``device="gpu"``),
``index`` and ``valid`` stay on the CPU (bookkeeping for gathering predictions).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cmkd_scale.config import DataConfig
from cmkd_scale.data.manifest import DataError, ShardSet
from cmkd_scale.data.members import MemberReader
from cmkd_scale.data.pipeline import DaliRunner, FeatureSpec
from cmkd_scale.data.sampler import AugmentSpec, StepPlan, TrainSampler
from cmkd_scale.data.source import PlannedSource, SourceBatch

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """One micro-batch, as the student and the teacher both see it."""

    fbank: torch.Tensor  # [B, target_length, num_mel_bins] float32, normalised (+augmented)
    labels: torch.Tensor  # [B, C] float32 (mixed with the same lambda under mixup)
    keys: list[str]  # the primary clip's key
    index: torch.Tensor  # [B] int64 global sample index (eval: -1 for padding rows)
    valid: torch.Tensor  # [B] bool (eval: False for padding rows of the last batch)
    mixed_with: list[str | None] = field(default_factory=list)  # mixup partner's key
    lam: torch.Tensor | None = None  # [B] float32 weight of the primary clip (train)
    view: torch.Tensor | None = None  # [B] int64 the sample's view (train, data.views > 0)


def resolve_device(device: str) -> str:
    """'auto' -> 'gpu' when torch sees CUDA, else 'cpu'."""
    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'gpu', got {device!r}")
    return device


def eval_spec(cfg: DataConfig) -> FeatureSpec:
    """Eval-mode features: padded/cropped, normalised, no augmentation."""
    return FeatureSpec(
        num_mel_bins=cfg.num_mel_bins,
        target_length=cfg.target_length,
        normalize=True,
        norm_mean=cfg.norm_mean,
        norm_std=cfg.norm_std,
    )


def check_mel_bins(cfg: DataConfig) -> None:
    if cfg.num_mel_bins < 4:
        raise ValueError("data.num_mel_bins must be >= 4")


class TrainLoader:
    """Training batches from a shard set, a pure function of (seed, epoch, rank, step)."""

    def __init__(
        self,
        cfg: DataConfig,
        *,
        micro_batch: int,
        rank: int,
        world_size: int,
        seed: int,
        device: str,
        exact: bool = False,
    ) -> None:
        """``exact``: never replace an unreadable sample (training from a teacher cache)."""
        check_mel_bins(cfg)
        self.cfg = cfg
        self.device = resolve_device(device)
        self.shards = ShardSet(cfg.train)
        if cfg.corrupt_policy == "error":
            self.shards.require_all_shards()
        self.manifest = self.shards.manifest
        self.num_classes = self.shards.num_classes
        self.class_names = self.shards.class_names
        self.augment = AugmentSpec(
            mixup=cfg.mixup,
            mixup_alpha=cfg.mixup_alpha,
            freqm=cfg.freqm,
            timem=cfg.timem,
            num_mel_bins=cfg.num_mel_bins,
            target_length=cfg.target_length,
        )
        self.sampler = TrainSampler(
            shard_sizes=[int(s["num_samples"]) for s in self.shards.shards],
            micro_batch=micro_batch,
            rank=rank,
            world_size=world_size,
            seed=seed,
            augment=self.augment,
            weights=self.shards.weights() if cfg.balanced else None,
            shuffle_shards=cfg.shuffle_shards,
            views=cfg.views,
            view_seed=cfg.view_seed,
        )
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.reader = MemberReader(self.shards)
        self.spec = FeatureSpec(
            num_mel_bins=cfg.num_mel_bins,
            target_length=cfg.target_length,
            normalize=True,
            norm_mean=cfg.norm_mean,
            norm_std=cfg.norm_std,
            augment=True,
        )
        self.source = PlannedSource(cfg, self.shards, self.sampler, self.reader)
        self.source.exact = exact
        self.epoch, self.step = 0, 0  # position: the next batch epoch_batches would yield
        self._runner: DaliRunner | None = None  # kept across epochs
        self._plans: Iterator[StepPlan] = iter(())

    @property
    def skipped(self) -> int:
        """Unreadable samples replaced so far (corrupt_policy=skip)."""
        return self.source.skipped

    # ------------------------------------------------------------------ position

    def state_dict(self) -> dict[str, Any]:
        """Position (the next batch to yield) and what makes the sequence reproducible."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "seed": self.sampler.seed,
            "rank": self.sampler.rank,
            "world_size": self.sampler.world_size,
            "micro_batch": self.sampler.micro_batch,
            "balanced": self.sampler.balanced,
            "num_samples": self.sampler.num_samples,
            "views": self.sampler.views,
            "view_seed": self.sampler.view_seed,
            "skipped": self.source.skipped,
            "bad": np.flatnonzero(self.source.bad).tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position; refuse a state from a different sampling setup."""
        mine = self.state_dict()
        state = {"views": 0, "view_seed": 0, **state}  # states from before data.views
        keys = ("seed", "world_size", "micro_batch", "balanced", "num_samples", "views")
        for key in (*keys, "view_seed"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"loader state has {key}={state.get(key)!r} but this run has {mine[key]!r}: "
                    "exact resume needs the same seed, world size, micro batch, views and "
                    "shard set"
                )
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.source.skipped = int(state.get("skipped", 0))
        self.source.bad[np.asarray(state.get("bad", []), dtype=np.int64)] = True

    # ------------------------------------------------------------------ batches

    def epoch_batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """Exactly ``steps_per_epoch - start_step`` batches of ``epoch`` for this rank.

        The DALI pipeline is built once and kept across epochs (its source reads the current
        epoch's plans); it is rebuilt after a pipeline error or when an epoch was left early
        (then it may hold prefetched batches of the abandoned plans).
        """
        step = start_step
        while step < self.steps_per_epoch:
            self._plans = self.sampler.plans(epoch, step)
            runner = self._train_runner()
            finished = False
            try:
                while step < self.steps_per_epoch:
                    try:
                        fbank, labels, (pairs, mix) = runner.run()
                    except (DataError, StopIteration):
                        raise
                    except Exception as exc:  # DALI aborted: find the member, then rebuild
                        self._close_runner()
                        self.source.after_pipeline_error(epoch, step, exc)
                        break
                    batch = self._batch(fbank, labels, pairs, [m[0] for m in mix])
                    step += 1
                    self.epoch, self.step = (
                        (epoch + 1, 0) if step == self.steps_per_epoch else (epoch, step)
                    )
                    finished = step == self.steps_per_epoch
                    yield batch
            finally:
                if finished and runner.at_epoch_end():
                    runner.rewind()  # ready for the next epoch's plans
                else:
                    self._close_runner()

    def _train_runner(self) -> DaliRunner:
        if self._runner is None:
            self._runner = DaliRunner(
                spec=self.spec,
                device=self.device,
                batch_size=self.sampler.micro_batch,
                num_threads=self.cfg.num_threads,
                prefetch=self.cfg.prefetch,
                source=self._next_inputs,
            )
        return self._runner

    def _close_runner(self) -> None:
        if self._runner is not None:
            self._runner.close()
            self._runner = None

    def _next_inputs(self) -> SourceBatch:
        """The pipeline's source: the next planned step's inputs."""
        return self.step_inputs(next(self._plans))  # StopIteration ends the epoch for DALI

    def _batch(self, fbank: torch.Tensor, labels: torch.Tensor, pairs: list, lam: list) -> Batch:
        keys = self.shards.table.keys
        primary = [int(p[0]) for p in pairs]
        partner = [int(p[1]) for p in pairs]
        views = [int(p[2]) for p in pairs]
        return Batch(
            fbank=fbank,
            labels=labels.to(fbank.device),
            keys=[keys[i] for i in primary],
            index=torch.tensor(primary, dtype=torch.int64),
            valid=torch.ones(len(primary), dtype=torch.bool),
            mixed_with=[keys[p] if p >= 0 else None for p in partner],
            lam=torch.tensor(np.asarray(lam, dtype=np.float32).reshape(-1)),
            view=torch.tensor(views, dtype=torch.int64) if self.sampler.views else None,
        )

    def step_inputs(self, plan: StepPlan) -> SourceBatch:
        """One planned step's DALI inputs (read, checked, mixed)."""
        return self.source.batch(plan)

    def close(self) -> None:
        self._close_runner()
        self.reader.close()

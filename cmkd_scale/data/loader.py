"""Training and evaluation loaders: shard set -> DALI -> ``Batch`` of torch tensors.

``TrainLoader`` follows the sampler's plans (see sampler.py for why training does not use
``readers.webdataset``): per step it reads the planned members by byte range, checks them,
mixes the labels with the planned lambda and feeds bytes and augmentation parameters to the
DALI pipeline through ``fn.external_source``. ``EvalLoader`` reads with DALI's
``readers.webdataset`` (contiguous split per rank, last batch padded), so every eval clip is
produced exactly once across ranks, in global order.

Tensors: ``fbank`` and ``labels`` are on the pipeline's device (CUDA for ``device="gpu"``),
``index`` and ``valid`` stay on the CPU (bookkeeping for gathering predictions).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cmkd_scale.config import DataConfig
from cmkd_scale.data.manifest import DataError, ShardSet
from cmkd_scale.data.members import MemberError, MemberReader, Sample, silent_flac
from cmkd_scale.data.pipeline import DaliRunner, FeatureSpec, erase_regions
from cmkd_scale.data.sampler import AugmentSpec, StepPlan, TrainSampler

log = logging.getLogger(__name__)

_MAX_STAND_INS = 1000  # candidates tried for one unreadable sample before giving up


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


def _check_mel_bins(cfg: DataConfig) -> None:
    if cfg.num_mel_bins < 4:
        raise ValueError("data.num_mel_bins must be >= 4")


class _Progress:
    """Logs clips/s and ETA every ``every`` seconds."""

    def __init__(self, what: str, total: int, every: float = 30.0) -> None:
        self.what, self.total, self.every = what, total, every
        self.start = self.last = time.monotonic()
        self.done = 0

    def update(self, clips: int) -> None:
        self.done += clips
        now = time.monotonic()
        if now - self.last >= self.every:
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            log.info(
                "%s: %d/%d clips, %.1f clips/s, ETA %.0f s",
                self.what,
                self.done,
                self.total,
                rate,
                eta,
            )
            self.last = now


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
    ) -> None:
        _check_mel_bins(cfg)
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
        self.skipped = 0  # unreadable samples replaced (corrupt_policy=skip)
        self.bad = np.zeros(self.shards.num_samples, dtype=bool)
        self.bad[self.shards.table.start < 0] = True  # rows of missing shards
        if self.bad.any():
            log.warning(
                "%d samples of missing shards %s will be replaced by others; %s",
                int(self.bad.sum()),
                self.shards.missing_shards,
                self.shards.verify_hint,
            )
        self._silent = silent_flac()
        self.epoch, self.step = 0, 0  # position: the next batch epoch_batches would yield
        self._runner: DaliRunner | None = None  # kept across epochs
        self._plans: Iterator[StepPlan] = iter(())

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
            "skipped": self.skipped,
            "bad": np.flatnonzero(self.bad).tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position; refuse a state from a different sampling setup."""
        mine = self.state_dict()
        for key in ("seed", "world_size", "micro_batch", "balanced", "num_samples"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"loader state has {key}={state.get(key)!r} but this run has {mine[key]!r}: "
                    "exact resume needs the same seed, world size, micro batch and shard set"
                )
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.skipped = int(state.get("skipped", 0))
        self.bad[np.asarray(state.get("bad", []), dtype=np.int64)] = True

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
                        self._after_pipeline_error(epoch, step, exc)
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

    def _next_inputs(self) -> tuple[list[np.ndarray], ...]:
        """The external_source callback: the next planned step's inputs."""
        return self.step_inputs(next(self._plans))  # StopIteration ends the epoch for DALI

    def _batch(self, fbank: torch.Tensor, labels: torch.Tensor, pairs: list, lam: list) -> Batch:
        keys = self.shards.table.keys
        primary = [int(p[0]) for p in pairs]
        partner = [int(p[1]) for p in pairs]
        return Batch(
            fbank=fbank,
            labels=labels.to(fbank.device),
            keys=[keys[i] for i in primary],
            index=torch.tensor(primary, dtype=torch.int64),
            valid=torch.ones(len(primary), dtype=torch.bool),
            mixed_with=[keys[p] if p >= 0 else None for p in partner],
            lam=torch.tensor(np.asarray(lam, dtype=np.float32).reshape(-1)),
        )

    def step_inputs(self, plan: StepPlan) -> tuple[list[np.ndarray], ...]:
        """Read, check and arrange one step's members as the pipeline source's per-sample
        arrays (``pipeline.SAMPLED_OUTPUTS``)."""
        out: tuple[list[np.ndarray], ...] = tuple([] for _ in range(7))
        audio, partner_audio, mix, anchor, shape, labels, index = out
        for i, pos in enumerate(plan.position):
            main = self._readable(plan.epoch, int(pos), 0, int(plan.index[i]))
            lam = float(plan.lam[i])
            if plan.partner[i] >= 0:
                other = self._readable(plan.epoch, int(pos), 1, int(plan.partner[i]))
                partner_audio.append(other.flac)
                labels.append(lam * main.labels + (1.0 - lam) * other.labels)
                mix.append(np.array([lam, 1.0], dtype=np.float32))
                index.append(np.array([main.index, other.index], dtype=np.int64))
            else:
                partner_audio.append(self._silent)
                labels.append(main.labels.copy())
                mix.append(np.array([1.0, 0.0], dtype=np.float32))
                index.append(np.array([main.index, -1], dtype=np.int64))
            audio.append(main.flac)
            a, s = erase_regions(
                plan.freq_mask[i],
                plan.time_mask[i],
                self.cfg.target_length,
                self.cfg.num_mel_bins,
            )
            anchor.append(a)
            shape.append(s)
        return out

    def _readable(self, epoch: int, position: int, slot: int, index: int) -> Sample:
        """The planned sample, or under corrupt_policy=skip its first readable stand-in."""
        candidates = self.sampler.candidates(epoch, position, slot)
        for _ in range(_MAX_STAND_INS):
            if not self.bad[index]:
                try:
                    sample = self.reader.read(index)
                    self.reader.check(sample, self.num_classes)
                    return sample
                except MemberError as exc:
                    self._mark_bad(index, exc)
            index = next(candidates)
        raise DataError(
            f"no readable sample among {_MAX_STAND_INS} stand-ins; " + self.shards.verify_hint
        )

    def _mark_bad(self, index: int, exc: Exception) -> None:
        if self.cfg.corrupt_policy != "skip":
            raise DataError(
                f"{exc}; {self.shards.verify_hint}, or set data.corrupt_policy=skip to "
                "replace unreadable samples"
            ) from exc
        self.bad[index] = True
        self.skipped += 1
        log.warning("skipping unreadable sample (%d so far): %s", self.skipped, exc)

    def _after_pipeline_error(self, epoch: int, step: int, exc: Exception) -> None:
        """DALI failed on a member that passed the header check: pinpoint it by decoding."""
        suspects = []
        last = min(self.steps_per_epoch, step + self.cfg.prefetch + 1)
        for s in range(step, last):
            plan = self.sampler.plan(epoch, s)
            for i in np.concatenate([plan.index, plan.partner[plan.partner >= 0]]):
                if not self.bad[i] and not self.reader.decodes(int(i)):
                    suspects.append(int(i))
        if not suspects:
            raise DataError(
                f"the DALI pipeline failed at epoch {epoch} step {step}: {exc}"
            ) from exc
        for i in suspects:
            shard = self.shards.shards[self.shards.table.shard[i]]["name"]
            self._mark_bad(i, MemberError(shard, self.shards.table.keys[i], "does not decode"))

    def close(self) -> None:
        self._close_runner()
        self.reader.close()


class EvalLoader:
    """Every eval clip exactly once across ranks, in global order, last batch padded."""

    def __init__(
        self,
        cfg: DataConfig,
        *,
        micro_batch: int,
        rank: int,
        world_size: int,
        device: str,
        spec: FeatureSpec | None = None,
        url: str | None = None,
    ) -> None:
        _check_mel_bins(cfg)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.cfg = cfg
        self.device = resolve_device(device)
        self.spec = spec or eval_spec(cfg)
        self.shards = ShardSet(url or cfg.eval)
        self.shards.require_all_shards()
        if not self.shards.is_local:
            raise DataError(
                f"{self.shards.url}: DALI's webdataset reader needs the eval shards on a local "
                "(or mounted) filesystem; copy them locally and point data.eval there"
            )
        self.manifest = self.shards.manifest
        self.num_classes = self.shards.num_classes
        self.class_names = self.shards.class_names
        self.num_samples = self.shards.num_samples
        self.micro_batch, self.rank, self.world_size = micro_batch, rank, world_size
        # readers.webdataset's contiguous split: rank r reads [N*r//W, N*(r+1)//W).
        self.first = self.num_samples * rank // world_size
        self.end = self.num_samples * (rank + 1) // world_size
        largest = math.ceil(self.num_samples / world_size)
        self.steps = math.ceil(largest / micro_batch)
        self.reader = MemberReader(self.shards)
        self._runner: DaliRunner | None = None  # kept from one pass to the next

    def batches(self) -> Iterator[Batch]:
        """``steps`` batches; rows beyond this rank's part are padding (valid=False)."""
        for fbank, labels, index, valid in self._reader_batches():
            keys = [
                self.shards.table.keys[i] if ok else "" for i, ok in zip(index, valid, strict=True)
            ]
            yield Batch(
                fbank=fbank,
                labels=labels.to(fbank.device),
                keys=keys,
                index=torch.from_numpy(np.where(valid, index, -1)),
                valid=torch.from_numpy(valid),
            )

    def feature_arrays(self) -> Iterator[tuple[str, np.ndarray]]:
        """(key, features [frames, bins]) per clip of this rank, e.g. unpadded raw log-mel."""
        for fbank, _, index, valid in self._reader_batches():
            rows = fbank if isinstance(fbank, list) else fbank.cpu().numpy()
            for feats, i, ok in zip(rows, index, valid, strict=True):
                if ok:
                    yield self.shards.table.keys[i], np.asarray(feats, dtype=np.float32)

    def _reader_batches(self) -> Iterator[tuple[Any, torch.Tensor, np.ndarray, np.ndarray]]:
        """The pass's batches. The reader pipeline is kept for the next pass (the trainer
        evaluates every epoch): it sticks to this rank's shard and, after the last batch,
        has already prefetched the next pass's first batches. A pass left early or failed
        drops the pipeline (its position would be mid-pass)."""
        count = self.end - self.first
        real_steps = math.ceil(count / self.micro_batch)
        runner = self._eval_runner() if real_steps else None
        # The reader pads every rank's part to the largest one: its epoch may end with
        # batches of repeats (rows beyond this rank's part, valid=False); they are taken so
        # that the next pass starts at the part's beginning.
        reader_steps = runner.batches_per_epoch() if runner is not None else 0
        progress = _Progress(f"eval rank {self.rank}", count)
        finished = False
        try:
            for step in range(self.steps):
                index = self.first + step * self.micro_batch + np.arange(self.micro_batch)
                valid = index < self.end
                if step < reader_steps:
                    try:
                        fbank, labels, (infos,) = runner.run()
                    except Exception as exc:
                        raise self._pinpoint(step, exc) from exc
                    self._check_order(index, valid, infos)
                else:  # this rank has fewer clips than the largest: an all-padding batch
                    fbank, labels = self._padding()
                progress.update(int(valid.sum()))
                finished = step == self.steps - 1 and reader_steps <= self.steps
                yield fbank, labels, index, valid
        finally:
            if not finished:
                self._close_runner()

    def _eval_runner(self) -> DaliRunner:
        if self._runner is None:
            self._runner = DaliRunner(
                spec=self.spec,
                device=self.device,
                batch_size=self.micro_batch,
                num_threads=self.cfg.num_threads,
                prefetch=self.cfg.prefetch,
                tar_paths=[self.shards.path(s) for s in self.shards.shards],
                index_paths=[self.shards.index_path(s) for s in self.shards.shards],
                # DALI refuses more shards than samples; then each rank has 0 or 1 clip,
                # and clip i alone is DALI's shard i of N.
                shard_id=self.rank if self.world_size <= self.num_samples else self.first,
                num_shards=min(self.world_size, self.num_samples),
            )
        return self._runner

    def _close_runner(self) -> None:
        if self._runner is not None:
            self._runner.close()
            self._runner = None

    def _padding(self) -> tuple[Any, torch.Tensor]:
        labels = torch.zeros(self.micro_batch, self.num_classes)
        if self.spec.target_length is None:
            return [np.zeros((0, self.spec.num_mel_bins), np.float32)] * self.micro_batch, labels
        shape = (self.micro_batch, self.spec.target_length, self.spec.num_mel_bins)
        device = torch.cuda.current_device() if self.device == "gpu" else "cpu"
        return torch.zeros(shape, device=device), labels

    def _check_order(self, index: np.ndarray, valid: np.ndarray, infos: list) -> None:
        """The reader's member names must be the ones this loader expects, in order."""
        keys = self.shards.table.keys
        for i, ok, info in zip(index, valid, infos, strict=True):
            if not ok:
                continue
            name = bytes(info).decode().rsplit(":", 1)[-1].rsplit(".", 1)[0]
            if name != keys[i]:
                raise DataError(
                    f"eval reader produced {name!r} where sample {i} ({keys[i]!r}) was "
                    f"expected; the index files disagree with the tars: {self.shards.verify_hint}"
                )

    def _pinpoint(self, step: int, exc: Exception) -> DataError:
        """Name the shard and key DALI failed on (decode this and the prefetched batches)."""
        lo = self.first + step * self.micro_batch
        hi = min(self.end, lo + (self.cfg.prefetch + 1) * self.micro_batch)
        for i in range(lo, hi):
            if not self.reader.decodes(i):
                shard = self.shards.shards[self.shards.table.shard[i]]["name"]
                return DataError(
                    f"shard {shard}, sample {self.shards.table.keys[i]}: does not decode; "
                    f"{self.shards.verify_hint}"
                )
        return DataError(f"the DALI eval pipeline failed at step {step}: {exc}")

    def close(self) -> None:
        self._close_runner()
        self.reader.close()

"""Per-rank training plans: which clips each step reads, and every random augmentation draw.

Why a Python sampler instead of ``fn.readers.webdataset`` for training: that reader splits the
shard list into one contiguous block per rank and shuffles through a local buffer, so it can
neither draw with replacement in proportion to per-clip weights (AST's balanced sampling) nor
resume at an exact sample in the middle of an epoch. Here a plan names, for every (epoch, step,
rank), the global sample indices and their mixup partner, lambda and SpecAugment masks; the
loader reads those members by byte range (offsets from the DALI index files) and hands them to
DALI through ``fn.external_source``. Everything is a pure function of
(seed, epoch, rank, world_size, step), so a restarted run continues with exactly the same
samples and augmentation, and the teacher sees the very batch the student sees.

Random numbers come from keyed generators: each draw's generator is built from a key such as
(seed, epoch, position) (per-sample draws: a Philox stream keyed by (seed, epoch, purpose) at
counter = position), never from state carried between steps, so any step can be planned
without replaying the steps before it.

Shuffling (``balanced=False``): every epoch the shard order is permuted, the permuted shards are
cut into groups of ``shuffle_shards`` consecutive shards, and each group's samples are permuted
together (``0`` = one group = a full permutation of the epoch). Every window of the order thus
mixes the samples of several shards, so shards that each hold few classes (a class-sorted list
packed in input order, or shards written by other tools) still give class-diverse batches.
Random access makes a full permutation cheap to compute; the trade-off is I/O locality: a full
permutation reads single members from all shards in random order (fine on local disks and page
cache), while a group of a few shards keeps every step's reads inside those tars (friendlier
to object stores and to the page cache of a large set).

The epoch's global order is cut into steps of
``world_size * micro_batch`` samples and rank ``r`` takes the ``r``-th ``micro_batch`` of each,
so ranks are disjoint and together read ``steps_per_epoch * world_size * micro_batch`` samples;
``steps_per_epoch = num_samples // (world_size * micro_batch)`` (the remainder, different every
epoch, is left out so every rank runs the same number of steps).

Balanced sampling (``weights`` given): each rank draws ``steps_per_epoch * micro_batch`` samples
with replacement in proportion to the weights, from its own stream keyed by
(seed, epoch, rank); the streams are independent, the epoch length is the same as above.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

# Stream tags: keep the draws for different purposes independent of each other.
_SHARD_ORDER, _WINDOW_SHUFFLE, _BALANCED, _AUGMENT, _REPLACE = 11, 12, 13, 14, 15
_VIEW, _VIEW_AUGMENT = 16, 17


def keyed_rng(*key: int) -> np.random.Generator:
    """A counter-based generator (Philox) fully determined by the integer key."""
    return np.random.Generator(np.random.Philox(np.random.SeedSequence([int(k) for k in key])))


@functools.lru_cache(maxsize=64)
def _philox_key(*key: int) -> np.ndarray:
    return np.random.SeedSequence([int(k) for k in key]).generate_state(2, np.uint64)


def position_rng(position: int, *key: int) -> np.random.Generator:
    """The generator of one sample position within the stream ``key``: Philox keyed by the
    hashed stream key, its counter starting at the position (word 1, so no two positions'
    draws overlap). Cheaper per sample than hashing (key, position) into a new seed."""
    counter = np.array([0, int(position), 0, 0], dtype=np.uint64)
    return np.random.Generator(np.random.Philox(key=_philox_key(*key), counter=counter))


def mask_params(u_width: float, u_start: float, max_width: int, size: int) -> tuple[int, int]:
    """torchaudio's ``mask_along_axis`` draw: width = U*param, start = U*(size - width)."""
    if max_width < 1:
        return 0, 0
    value = u_width * max_width
    start = int(u_start * (size - value))
    return start, int(value)


@dataclass(frozen=True, kw_only=True)
class AugmentSpec:
    """AST's training augmentation settings (see ast/src/dataloader.py)."""

    mixup: float  # probability that a clip is mixed with a random other clip
    mixup_alpha: float  # lambda ~ Beta(alpha, alpha)
    freqm: int  # max frequency-mask width (mel bins)
    timem: int  # max time-mask width (frames)
    num_mel_bins: int
    target_length: int

    def __post_init__(self) -> None:
        if self.mixup > 0 and self.mixup_alpha <= 0:
            raise ValueError("data.mixup_alpha must be > 0 when data.mixup > 0")


@dataclass(frozen=True)
class StepPlan:
    """One rank's micro-batch for one step: samples and their augmentation parameters."""

    epoch: int
    step: int
    index: np.ndarray  # int64 [B] global sample index
    position: np.ndarray  # int64 [B] position in the epoch's global order (the RNG key)
    partner: np.ndarray  # int64 [B] mixup partner's global index, -1 = not mixed
    lam: np.ndarray  # float32 [B] weight of the primary clip (1.0 = not mixed)
    freq_mask: np.ndarray  # int64 [B, 2] (first bin, width)
    time_mask: np.ndarray  # int64 [B, 2] (first frame, width)
    view: np.ndarray | None = None  # int64 [B] the sample's view (data.views > 0), else None


class TrainSampler:
    """Plans every rank's training steps as a pure function of (seed, epoch, rank, step)."""

    def __init__(
        self,
        *,
        shard_sizes: list[int],
        micro_batch: int,
        rank: int,
        world_size: int,
        seed: int,
        augment: AugmentSpec,
        weights: np.ndarray | None = None,
        shuffle_shards: int = 0,
        views: int = 0,
        view_seed: int = 0,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if micro_batch < 1:
            raise ValueError("micro_batch must be >= 1")
        self.shard_sizes = [int(n) for n in shard_sizes]
        self.num_samples = sum(self.shard_sizes)
        self.micro_batch = micro_batch
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.augment = augment
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float64)
        if shuffle_shards < 0:
            raise ValueError("shuffle_shards must be >= 0 (0 = a full permutation)")
        self.shuffle_shards = shuffle_shards
        if views < 0:
            raise ValueError("views must be >= 0 (0 = augmentation drawn per epoch position)")
        self.views = views
        self.view_seed = view_seed  # the views' augmentation: shared by runs of every seed
        self.steps_per_epoch = self.num_samples // (world_size * micro_batch)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{self.num_samples} training samples cannot fill one step of "
                f"{world_size} ranks x micro_batch {micro_batch}: lower deepspeed.micro_batch"
            )
        self._cache: tuple[int, np.ndarray] | None = None

    @property
    def balanced(self) -> bool:
        return self.weights is not None

    # ------------------------------------------------------------------ sample order

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The epoch's global sample order (not balanced): shard order + per-group shuffle."""
        starts = np.cumsum([0, *self.shard_sizes])
        shard_order = keyed_rng(self.seed, epoch, _SHARD_ORDER).permutation(len(self.shard_sizes))
        group = self.shuffle_shards if self.shuffle_shards > 0 else len(shard_order)
        rng = keyed_rng(self.seed, epoch, _WINDOW_SHUFFLE)
        windows = []
        for lo in range(0, len(shard_order), group):
            members = [np.arange(starts[s], starts[s + 1]) for s in shard_order[lo : lo + group]]
            windows.append(rng.permutation(np.concatenate(members).astype(np.int64)))
        return np.concatenate(windows)

    def _rank_indices(self, epoch: int) -> np.ndarray:
        """This rank's samples for the whole epoch, [steps_per_epoch, micro_batch]."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        steps, batch, world = self.steps_per_epoch, self.micro_batch, self.world_size
        if self.balanced:
            rng = keyed_rng(self.seed, epoch, _BALANCED, self.rank)
            cdf = np.cumsum(self.weights)
            draws = rng.random(steps * batch) * cdf[-1]
            picked = np.searchsorted(cdf, draws, side="right")
            indices = np.minimum(picked, self.num_samples - 1).reshape(steps, batch)
        else:
            order = self.epoch_order(epoch)[: steps * world * batch]
            indices = order.reshape(steps, world, batch)[:, self.rank, :]
        self._cache = (epoch, indices)
        return indices

    # ------------------------------------------------------------------ plans

    def plan(self, epoch: int, step: int) -> StepPlan:
        """The samples and augmentation draws of (epoch, step) for this rank.

        Without views, a sample's augmentation is drawn for its epoch position. With
        ``views = V``, each position draws one of the sample's V views, and a view's
        augmentation is a pure function of (view_seed, sample index, view): the same view of a
        sample is augmented the same way in every epoch (what a teacher cache stores).
        """
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} outside 0..{self.steps_per_epoch - 1}")
        index = self._rank_indices(epoch)[step].copy()
        first = (step * self.world_size + self.rank) * self.micro_batch
        position = np.arange(first, first + self.micro_batch, dtype=np.int64)
        if not self.views:
            rngs = [position_rng(pos, self.seed, epoch, _AUGMENT) for pos in position]
            return StepPlan(epoch, step, index, position, *self._augmentations(rngs))
        view = np.array(
            [position_rng(pos, self.seed, epoch, _VIEW).integers(self.views) for pos in position],
            dtype=np.int64,
        )
        return self.view_plan(index, view, epoch=epoch, step=step, position=position)

    def view_plan(
        self,
        index: np.ndarray,
        view: np.ndarray,
        *,
        epoch: int = -1,
        step: int = -1,
        position: np.ndarray | None = None,
    ) -> StepPlan:
        """The plan of given (sample, view) pairs: the teacher cache pass reads any of them."""
        if not self.views:
            raise ValueError("view_plan needs views > 0 (data.views)")
        index, view = np.asarray(index, dtype=np.int64), np.asarray(view, dtype=np.int64)
        if view.size and (view.min() < 0 or view.max() >= self.views):
            raise IndexError(f"views must lie in 0..{self.views - 1}")
        rngs = [
            position_rng(int(i) * self.views + int(v), self.view_seed, _VIEW_AUGMENT)
            for i, v in zip(index, view, strict=True)
        ]
        if position is None:
            position = np.full(len(index), -1, dtype=np.int64)
        return StepPlan(epoch, step, index, position, *self._augmentations(rngs), view=view)

    def _augmentations(self, rngs: list[np.random.Generator]) -> tuple[np.ndarray, ...]:
        """Partner, lambda and the two masks of each sample, one generator per sample."""
        batch = len(rngs)
        partner = np.full(batch, -1, dtype=np.int64)
        lam = np.ones(batch, dtype=np.float32)
        freq_mask = np.zeros((batch, 2), dtype=np.int64)
        time_mask = np.zeros((batch, 2), dtype=np.int64)
        aug = self.augment
        for i, rng in enumerate(rngs):
            # Fixed draw order per sample, whatever the settings: keys stay comparable.
            u_mix, u_partner, u_fw, u_fs, u_tw, u_ts = rng.random(6)
            beta = rng.beta(aug.mixup_alpha, aug.mixup_alpha) if aug.mixup_alpha > 0 else 1.0
            if u_mix < aug.mixup:  # AST: the partner is uniform over the set, not balanced
                partner[i] = min(int(u_partner * self.num_samples), self.num_samples - 1)
                lam[i] = beta
            freq_mask[i] = mask_params(u_fw, u_fs, aug.freqm, aug.num_mel_bins)
            time_mask[i] = mask_params(u_tw, u_ts, aug.timem, aug.target_length)
        return partner, lam, freq_mask, time_mask

    def plans(self, epoch: int, start_step: int = 0) -> Iterator[StepPlan]:
        for step in range(start_step, self.steps_per_epoch):
            yield self.plan(epoch, step)

    def candidates(self, epoch: int, position: int, slot: int) -> Iterator[int]:
        """Stand-ins for an unreadable sample, in a fixed order keyed by its position.

        The order does not depend on which samples are known to be bad, so a restarted run
        picks the same stand-in as the uninterrupted one (the caller skips bad candidates).
        Slot 0 is the sample itself (drawn by weight when balanced), slot 1 its mixup partner.
        """
        rng = keyed_rng(self.seed, epoch, _REPLACE, position, slot)
        cdf = np.cumsum(self.weights) if self.balanced and slot == 0 else None
        while True:
            if cdf is None:
                yield int(rng.integers(self.num_samples))
            else:
                picked = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
                yield min(picked, self.num_samples - 1)

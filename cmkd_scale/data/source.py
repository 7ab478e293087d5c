"""The sampler's plan -> a named ``SourceBatch``: the training inputs of the DALI graph.

``PlannedSource`` reads the members a ``StepPlan`` names by byte range, checks them, replaces
unreadable ones by stand-ins (``data.corrupt_policy=skip``), mixes the labels with the planned
lambda and arranges everything per sample, by field name. ``pipeline.py`` takes the fields in
``SourceBatch.FIELDS`` order through one ``fn.external_source``. No DALI import here.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from cmkd_scale.config import DataConfig
from cmkd_scale.data.manifest import DataError, ShardSet
from cmkd_scale.data.members import MemberError, MemberReader, Sample, silent_flac
from cmkd_scale.data.sampler import StepPlan, TrainSampler

log = logging.getLogger(__name__)

_MAX_STAND_INS = 1000  # candidates tried for one unreadable sample before giving up


@dataclass(frozen=True)
class SourceBatch:
    """One training step's DALI inputs: each field holds one array per sample."""

    audio: list[np.ndarray]  # uint8: the primary clip's FLAC bytes
    partner: list[np.ndarray]  # uint8: the mixup partner's FLAC bytes (silence when unmixed)
    mix: list[np.ndarray]  # float32 [lambda, 1.0 if mixed else 0.0]
    erase_anchor: list[np.ndarray]  # float32 [4]: fn.erase anchors (frequency, time band)
    erase_shape: list[np.ndarray]  # float32 [4]: fn.erase shapes
    labels: list[np.ndarray]  # float32 [C]: labels mixed with the same lambda
    index: list[np.ndarray]  # int64 [primary, partner or -1, view or -1]: indices, the view

    # field -> element type, in the order of the graph's external_source outputs
    DTYPES: ClassVar[dict[str, type]] = {
        "audio": np.uint8,
        "partner": np.uint8,
        "mix": np.float32,
        "erase_anchor": np.float32,
        "erase_shape": np.float32,
        "labels": np.float32,
        "index": np.int64,
    }

    def __post_init__(self) -> None:
        sizes = {f.name: len(getattr(self, f.name)) for f in dataclasses.fields(self)}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"SourceBatch fields differ in batch size: {sizes}")

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        """The field names, in the graph's order."""
        return tuple(cls.DTYPES)

    def arrays(self) -> tuple[list[np.ndarray], ...]:
        """The per-sample arrays in ``fields()`` order (what ``fn.external_source`` gets)."""
        return tuple(getattr(self, name) for name in self.fields())

    def __len__(self) -> int:
        return len(self.audio)


def erase_regions(
    freq_mask: np.ndarray, time_mask: np.ndarray, target_length: int, num_mel_bins: int
) -> tuple[np.ndarray, np.ndarray]:
    """fn.erase anchors/shapes for one sample: the frequency band, then the time band."""
    (f0, fw), (t0, tw) = freq_mask, time_mask
    anchor = np.array([0, f0, t0, 0], dtype=np.float32)
    shape = np.array([target_length, fw, tw, num_mel_bins], dtype=np.float32)
    return anchor, shape


class PlannedSource:
    """Builds the ``SourceBatch`` of a planned step; remembers unreadable samples."""

    def __init__(
        self, cfg: DataConfig, shards: ShardSet, sampler: TrainSampler, reader: MemberReader
    ) -> None:
        self.cfg, self.shards, self.sampler, self.reader = cfg, shards, sampler, reader
        self.num_classes = shards.num_classes
        self.skipped = 0  # unreadable samples replaced (corrupt_policy=skip)
        self.bad = np.zeros(shards.num_samples, dtype=bool)
        self.bad[shards.table.start < 0] = True  # rows of missing shards
        if self.bad.any():
            log.warning(
                "%d samples of missing shards %s will be replaced by others; %s",
                int(self.bad.sum()),
                shards.missing_shards,
                shards.verify_hint,
            )
        self._silent = silent_flac()
        # True: an unreadable planned sample is an error even under corrupt_policy=skip (a
        # teacher cache holds logits of the planned samples and views: a stand-in has none)
        self.exact = False

    def batch(self, plan: StepPlan) -> SourceBatch:
        """Read, check and arrange one step's members."""
        out: dict[str, list[np.ndarray]] = {name: [] for name in SourceBatch.fields()}
        views = plan.view if plan.view is not None else np.full(len(plan.index), -1)
        for i, pos in enumerate(plan.position):
            main = self.readable(plan.epoch, int(pos), 0, int(plan.index[i]))
            lam = float(plan.lam[i])
            if plan.partner[i] >= 0:
                other = self.readable(plan.epoch, int(pos), 1, int(plan.partner[i]))
                out["partner"].append(other.flac)
                out["labels"].append(lam * main.labels + (1.0 - lam) * other.labels)
                out["mix"].append(np.array([lam, 1.0], dtype=np.float32))
                pair = [main.index, other.index]
            else:
                out["partner"].append(self._silent)
                out["labels"].append(main.labels.copy())
                out["mix"].append(np.array([1.0, 0.0], dtype=np.float32))
                pair = [main.index, -1]
            out["index"].append(np.array([*pair, views[i]], dtype=np.int64))
            out["audio"].append(main.flac)
            anchor, shape = erase_regions(
                plan.freq_mask[i],
                plan.time_mask[i],
                self.cfg.target_length,
                self.cfg.num_mel_bins,
            )
            out["erase_anchor"].append(anchor)
            out["erase_shape"].append(shape)
        return SourceBatch(**out)

    def readable(self, epoch: int, position: int, slot: int, index: int) -> Sample:
        """The planned sample, or under corrupt_policy=skip its first readable stand-in."""
        if self.exact:
            return self._exactly(index)
        candidates = self.sampler.candidates(epoch, position, slot)
        for _ in range(_MAX_STAND_INS):
            if not self.bad[index]:
                try:
                    sample = self.reader.read(index)
                    self.reader.check(sample, self.num_classes)
                    return sample
                except MemberError as exc:
                    self.mark_bad(index, exc)
            index = next(candidates)
        raise DataError(
            f"no readable sample among {_MAX_STAND_INS} stand-ins; " + self.shards.verify_hint
        )

    def _exactly(self, index: int) -> Sample:
        """The planned sample itself (teacher cache: a stand-in would have no cached logits)."""
        key = self.shards.table.keys[index]
        fix = (
            "a teacher cache holds the teacher's logits for the planned samples only, so "
            f"none can be replaced; {self.shards.verify_hint}, then rerun"
        )
        if self.bad[index]:
            raise DataError(f"sample {key} (index {index}) is in a missing shard; {fix}")
        try:
            sample = self.reader.read(index)
            self.reader.check(sample, self.num_classes)
        except MemberError as exc:
            if getattr(exc, "unreachable", False):
                self.mark_bad(index, exc)  # raises the storage message
            raise DataError(f"{exc}; {fix}") from exc
        return sample

    def mark_bad(self, index: int, exc: Exception) -> None:
        """Remember an unreadable sample (corrupt_policy=skip), else raise naming the fix."""
        if getattr(exc, "unreachable", False):  # the object store went away: stop, resumable
            raise DataError(
                f"{exc}; the shard storage does not answer (checked with the client's retries: "
                "AWS_MAX_ATTEMPTS for S3). Training stops here; rerun the same command once it "
                "answers and the run resumes from its last checkpoint"
            ) from exc
        if self.cfg.corrupt_policy != "skip":
            raise DataError(
                f"{exc}; {self.shards.verify_hint}, or set data.corrupt_policy=skip to "
                "replace unreadable samples"
            ) from exc
        self.bad[index] = True
        self.skipped += 1
        log.warning("skipping unreadable sample (%d so far): %s", self.skipped, exc)

    def after_pipeline_error(self, epoch: int, step: int, exc: Exception) -> None:
        """DALI failed on a member that passed the header check: pinpoint it by decoding."""
        suspects = []
        last = min(self.sampler.steps_per_epoch, step + self.cfg.prefetch + 1)
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
            self.mark_bad(i, MemberError(shard, self.shards.table.keys[i], "does not decode"))

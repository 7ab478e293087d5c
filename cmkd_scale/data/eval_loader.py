"""Evaluation batches: every eval clip exactly once across ranks, in global order.

DALI's ``readers.webdataset`` reads a contiguous part of the shard set per rank; the last batch
is padded (``valid=False`` rows), and a rank with fewer clips than the largest part gets
all-padding batches, so every rank runs the same number of steps.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from cmkd_scale.config import DataConfig
from cmkd_scale.data.loader import Batch, check_mel_bins, eval_spec, resolve_device
from cmkd_scale.data.manifest import DataError, ShardSet, local_copy
from cmkd_scale.data.members import MemberReader
from cmkd_scale.data.pipeline import DaliRunner, FeatureSpec

log = logging.getLogger(__name__)


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
        check_mel_bins(cfg)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.cfg = cfg
        self.device = resolve_device(device)
        self.spec = spec or eval_spec(cfg)
        self.shards = ShardSet(url or cfg.eval)
        self.shards.require_all_shards()
        if not self.shards.is_local:  # DALI's webdataset reader opens local files only
            remote = self.shards.url
            self.shards = ShardSet(local_copy(self.shards))
            log.info("eval shards %s read from their local copy %s", remote, self.shards.root)
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

"""Resumable checkpoints: DeepSpeed state + our trainer state, a safe ``latest``, exports.

The export file format itself is models/exported.py.

Layout under ``run.dir``::

    checkpoints/<tag>/...                 DeepSpeed files (module, ZeRO partitions, schedule)
    checkpoints/<tag>/trainer-rank<r>.pt  TrainerState of rank r (loader position, RNG, ...)
    checkpoints/latest                    tag of the newest COMPLETE checkpoint
    models/epoch-<e>.pt, best.pt, wa.pt, final.pt   consolidated fp32 student for inference

``latest`` moves only after every rank has written everything (barrier), via an atomic
rename, so a crash mid-save leaves the previous checkpoint in charge.  Tags: ``epoch-003``
(end of epoch 3, kept for good) and ``step-000120`` (rotating, ``run.keep_checkpoints``).
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmkd_scale import dist
from cmkd_scale.config import Config
from cmkd_scale.models.exported import EXPORT_FORMAT, atomic_torch_save
from cmkd_scale.train import engine

log = logging.getLogger(__name__)

_STEP_TAG = re.compile(r"^step-(\d+)$")


@dataclass
class TrainerState:
    """Where training stands; saved per rank in every checkpoint."""

    epoch: int = 1  # 1-based epoch being trained
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed
    global_step: int = 0  # optimizer steps done
    # the model chosen on data.val (models/best.pt): its selection-metric value, the metric's
    # name (eval.select_metric), its checkpoint tag, epoch, step and its whole val summary
    best_score: float = float("-inf")
    best_metric: str = ""
    best_tag: str = ""
    best_epoch: int = 0
    best_step: int = 0
    best_summary: dict[str, float] = field(default_factory=dict)
    nonfinite_skips: int = 0
    tracker_run_id: str | None = None
    loader: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    world_size: int = 1

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> TrainerState:
        """The state a checkpoint holds; one of an older trainer chose best.pt by mAP on the
        eval set (``best_map``): that choice is not carried over to a choice on data.val."""
        saved = dict(saved)
        if "best_map" in saved:
            saved.pop("best_map")
            saved["best_tag"] = ""
            log.warning("checkpoint of an older trainer: its best model (chosen on eval) dropped")
        return cls(**saved)


def capture_rng() -> dict[str, Any]:
    """Every RNG the trainer touches (python, numpy, torch CPU, CUDA)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    if not state:
        return
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def step_tag(step: int) -> str:
    return f"step-{step:06d}"


class CheckpointManager:
    """Saves and restores checkpoints of one run directory (call on every rank)."""

    def __init__(self, run_dir: Path, *, rank: int, zero_stage: int, keep: int) -> None:
        self.ckpt_dir = run_dir / "checkpoints"
        self.models_dir = run_dir / "models"
        self.rank = rank
        self.zero_stage = zero_stage
        self.keep = keep
        if rank == 0:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            self.models_dir.mkdir(parents=True, exist_ok=True)

    def latest_tag(self) -> str | None:
        """The newest complete checkpoint's tag, or None for a fresh run."""
        pointer = self.ckpt_dir / "latest"
        if not pointer.is_file():
            return None
        tag = pointer.read_text().strip()
        if not tag or not (self.ckpt_dir / tag).is_dir():
            raise RuntimeError(
                f"{pointer} names checkpoint {tag!r}, which is missing; restore it or delete "
                f"{pointer} to start over"
            )
        return tag

    def save(self, ds_engine: Any, tag: str, state: TrainerState) -> None:
        """Write checkpoint ``tag`` (all ranks), then move ``latest`` to it."""
        tag_dir = self.ckpt_dir / tag
        if self.rank == 0:
            tag_dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        atomic_torch_save(asdict(state), tag_dir / f"trainer-rank{self.rank}.pt")
        client = {"trainer": {k: v for k, v in asdict(state).items() if k not in ("rng",)}}
        engine.save_checkpoint(ds_engine, self.ckpt_dir, tag, client)
        dist.barrier()  # every rank's files are on disk before `latest` may name them
        if self.rank == 0:
            _atomic_write_text(self.ckpt_dir / "latest", tag)
            self._prune(keep_tag=tag, best_tag=state.best_tag)
        dist.barrier()
        log.info("checkpoint %s saved (epoch %d, step %d)", tag, state.epoch, state.global_step)

    def load(self, ds_engine: Any, tag: str) -> TrainerState:
        """Restore engine + this rank's trainer state from ``tag``."""
        engine.load_checkpoint(ds_engine, self.ckpt_dir, tag)
        own = self.ckpt_dir / tag / f"trainer-rank{self.rank}.pt"
        fallback = self.ckpt_dir / tag / "trainer-rank0.pt"
        path = own if own.is_file() else fallback
        saved = torch.load(path, map_location="cpu", weights_only=False)
        state = TrainerState.from_saved(saved)
        if path is fallback and self.rank != 0:
            log.warning("no trainer state for rank %d in %s: RNG/loader re-derived", self.rank, tag)
            state.rng, state.loader = {}, {}
        restore_rng(state.rng)
        log.info("resumed from %s: epoch %d, step %d", tag, state.epoch, state.global_step)
        return state

    def _prune(self, *, keep_tag: str, best_tag: str) -> None:
        """Drop old step checkpoints beyond ``keep`` (never latest, best or epoch ends)."""
        steps = sorted(p.name for p in self.ckpt_dir.iterdir() if _STEP_TAG.match(p.name))
        old = steps[: max(len(steps) - self.keep, 0)]
        for name in old:
            if name not in (keep_tag, best_tag):
                shutil.rmtree(self.ckpt_dir / name, ignore_errors=True)

    def export(
        self, tag: str, dest: Path, *, cfg: Config, num_classes: int, class_names: list[str]
    ) -> Path:
        """Rank 0: consolidated fp32 student of checkpoint ``tag`` with its config embedded."""
        state_dict = engine.consolidated_fp32_state_dict(self.ckpt_dir, tag, self.zero_stage)
        payload = {
            "format": EXPORT_FORMAT,
            "model": state_dict,
            "config": cfg.to_dict(),
            "num_classes": num_classes,
            "class_names": list(class_names),
            "source_checkpoint": tag,
        }
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(payload, dest)
        log.info("exported %s -> %s", tag, dest)
        return dest

"""Resumable checkpoints: DeepSpeed state + our trainer state, a safe ``latest``, exports.

The export file format itself is models/exported.py.

Layout under ``run.dir``::

    checkpoints/<tag>/...                 DeepSpeed files (module, ZeRO partitions, schedule)
    checkpoints/<tag>/trainer-rank<r>.pt  TrainerState of rank r (loader position, RNG, ...)
    checkpoints/latest                    tag of the newest COMPLETE checkpoint
    models/epoch-<e>.pt, best.pt, wa.pt, final.pt   consolidated fp32 student for inference

``latest`` moves only after every rank has written everything (barrier), via an atomic
rename, so a crash mid-save leaves the previous checkpoint in charge.  Tags: ``epoch-003``
(end of epoch 3; the newest ``run.keep_epoch_checkpoints`` are kept) and ``step-000120``
(rotating, ``run.keep_checkpoints``).

Every checkpoint ends with ``<tag>/manifest.json`` (files, sizes, sha256; see integrity.py),
and resume takes the newest checkpoint whose files match it, setting broken ones aside.
Before each save rank 0 compares the free space with the measured size of the last checkpoint
(an estimate from the parameter count before the first); a save that cannot fit, or a write
that fails for lack of space, stops every rank with one message (:mod:`cmkd_scale.diskspace`).

Trust: the trainer state files are read weights-only (plain types and tensors); DeepSpeed's own
files through the weights-only unpickler with an allow-list of its four classes
(``engine.weights_only_loads``). Nothing in a run directory can run code when loaded.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmkd_scale import dist
from cmkd_scale.config import Config
from cmkd_scale.diskspace import StorageError, explain_storage_errors, free_bytes, human
from cmkd_scale.models.exported import EXPORT_FORMAT, atomic_torch_save
from cmkd_scale.train import engine, integrity

log = logging.getLogger(__name__)

_STEP_TAG = re.compile(r"^step-(\d+)$")
_EPOCH_TAG = re.compile(r"^epoch-(\d+)$")
_ANY_TAG = re.compile(r"^(step|epoch)-(\d+)$")
# free space a save needs on top of the last checkpoint's size (+2 %: sizes vary a little;
# DeepSpeed's helper scripts, the manifest, latest)
_SPACE_MARGIN = 64 << 10


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


# numpy's RNG state as older checkpoints pickled it (an ndarray); new ones hold a plain list
_LEGACY_RNG_GLOBALS = [
    np._core.multiarray._reconstruct,  # type: ignore[attr-defined]
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
]


def capture_rng() -> dict[str, Any]:
    """Every RNG the trainer touches (python, numpy, torch CPU, CUDA), as plain types and
    tensors only, so the trainer state loads with ``torch.load(weights_only=True)``."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    if not state:
        return
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
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

    def __init__(
        self,
        run_dir: Path,
        *,
        rank: int,
        zero_stage: int,
        keep: int,
        keep_epochs: int = 0,
        world_size: int = 1,
        estimated_bytes: int = 0,
    ) -> None:
        self.ckpt_dir = run_dir / "checkpoints"
        self.models_dir = run_dir / "models"
        self.rank = rank
        self.world_size = world_size
        self.zero_stage = zero_stage
        self.keep = keep
        self.keep_epochs = keep_epochs  # epoch-end training states kept (0 = all)
        # bytes of one checkpoint: measured (the last manifest) once there is one
        self.checkpoint_bytes = estimated_bytes
        self.measured = False
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
        """Write checkpoint ``tag`` (all ranks), its manifest, then move ``latest`` to it."""
        tag_dir = self.ckpt_dir / tag
        self._check_space(tag)
        if self.rank == 0:
            tag_dir.mkdir(parents=True, exist_ok=True)
            (tag_dir / integrity.MANIFEST).unlink(missing_ok=True)  # a re-save is incomplete
        dist.barrier()
        hint = (
            "Free some space (or point run.dir elsewhere) and rerun: the run resumes from "
            f"{self._latest_pointer() or 'the start (no complete checkpoint yet)'}"
        )
        with explain_storage_errors(
            f"checkpoint {tag}", tag_dir, needed=self.checkpoint_bytes or None, hint=hint
        ):
            atomic_torch_save(asdict(state), tag_dir / f"trainer-rank{self.rank}.pt")
            client = {"trainer": {k: v for k, v in asdict(state).items() if k not in ("rng",)}}
            engine.save_checkpoint(ds_engine, self.ckpt_dir, tag, client)
        dist.barrier()  # every rank's files are on disk before the manifest may list them
        start = time.perf_counter()
        own = integrity.hash_own_files(tag_dir, self.rank, self.world_size)
        hash_s = time.perf_counter() - start
        gathered = dist.gather_objects((own, hash_s))
        if self.rank == 0:
            assert gathered is not None
            files: dict[str, dict[str, Any]] = {}
            for part, _ in gathered:  # type: ignore[misc]
                files.update(part)
            meta = {
                "global_step": state.global_step,
                "epoch": state.epoch,
                "batch_in_epoch": state.batch_in_epoch,
                "world_size": self.world_size,
                "zero_stage": self.zero_stage,
            }
            with explain_storage_errors(f"checkpoint {tag}", tag_dir, needed=4096, hint=hint):
                total = integrity.write_manifest(tag_dir, files, meta)
                _atomic_write_text(self.ckpt_dir / "latest", tag)
            self.checkpoint_bytes, self.measured = total, True
            self._prune(keep_tag=tag, best_tag=state.best_tag)
            log.info(
                "checkpoint %s saved (epoch %d, step %d): %s in %d files, sha256 in %.2f s "
                "(slowest rank)",
                tag,
                state.epoch,
                state.global_step,
                human(total),
                len(files),
                max(h for _, h in gathered),  # type: ignore[misc]
            )
            self._warn_if_space_low()
        dist.barrier()

    def _latest_pointer(self) -> str | None:
        pointer = self.ckpt_dir / "latest"
        return pointer.read_text().strip() or None if pointer.is_file() else None

    def _check_space(self, tag: str, *, what: str = "") -> None:
        """All ranks: stop before writing ``tag`` when it cannot fit (rank 0 decides)."""
        verdict: str | None = None
        need = int(self.checkpoint_bytes * 1.02) + _SPACE_MARGIN
        if self.rank == 0 and self.checkpoint_bytes:
            free = free_bytes(self.ckpt_dir)
            if free is not None and free < need:
                how = "measured" if self.measured else "estimated from the parameter count"
                last = self._latest_pointer()
                verdict = (
                    f"{what or f'checkpoint {tag}: not written'}: it needs about {human(need)} "
                    f"({how}), "
                    f"{human(free)} are free on the filesystem of {self.ckpt_dir}. "
                    "Free some space (or point run.dir elsewhere) and rerun: the run resumes "
                    f"from {last or 'the start (no complete checkpoint yet)'}"
                )
        verdict = dist.broadcast_object(verdict)  # type: ignore[assignment]
        if verdict:
            raise StorageError(verdict, path=self.ckpt_dir / tag, needed=need, free=None)

    def _warn_if_space_low(self) -> None:
        """Rank 0, after a save: warn while there is room for fewer than 2 more checkpoints."""
        free = free_bytes(self.ckpt_dir)
        if free is None or not self.checkpoint_bytes:
            return
        room = free // self.checkpoint_bytes
        if room < 2:
            log.warning(
                "disk space: %s free on the filesystem of %s, one checkpoint takes %s: room "
                "for %d more; free space (or lower run.keep_checkpoints) before it runs out",
                human(free),
                self.ckpt_dir,
                human(self.checkpoint_bytes),
                room,
            )

    def resume_tag(self) -> str | None:
        """All ranks: the newest checkpoint every rank finds intact (None: a fresh run).

        Newer broken checkpoints are renamed ``<tag>.corrupt`` and incomplete ones (no
        manifest, written after the chosen one) removed, each with a warning naming it.
        """
        listing = self._scan() if self.rank == 0 else None
        listing = dist.broadcast_object(listing)  # type: ignore[assignment]
        assert isinstance(listing, dict)
        if listing["legacy"]:
            log.warning(
                "checkpoint %s has no manifest (written before manifests existed): loaded "
                "without verification",
                listing["legacy"],
            )
            return listing["legacy"]
        chosen: str | None = None
        for tag, manifest in listing["ordered"]:
            tag_dir = self.ckpt_dir / tag
            mine = integrity.check_own_files(tag_dir, manifest, self.rank, self.world_size)
            problems = [p for part in dist.all_gather_objects(mine) for p in part]  # type: ignore[union-attr]
            if not problems:
                chosen = tag
                self.checkpoint_bytes, self.measured = int(manifest["total_bytes"]), True
                break
            if self.rank == 0:
                kept = integrity.set_aside(tag_dir)
                log.warning(
                    "checkpoint %s is corrupt (%s): not resuming from it; set aside as %s "
                    "(delete it when no longer needed)",
                    tag,
                    "; ".join(problems[:4]),
                    kept,
                )
        if self.rank == 0:
            self._remove_partial(listing["partial"], chosen)
            if chosen and self._latest_pointer() != chosen:
                if listing["ordered"] and listing["ordered"][0][0] != chosen:
                    log.warning("resuming from %s, the newest intact checkpoint", chosen)
                _atomic_write_text(self.ckpt_dir / "latest", chosen)
            if chosen is None and listing["ordered"]:
                log.warning("no intact checkpoint is left in %s: starting over", self.ckpt_dir)
        if chosen is not None:  # no point training steps whose checkpoint cannot be written
            self._check_space(
                "next", what="not resuming: the next checkpoint would not fit on the disk"
            )
        dist.barrier()
        return chosen

    def _scan(self) -> dict[str, Any]:
        """Rank 0: tag dirs with a manifest (newest first), those without, a legacy tag."""
        if not self.ckpt_dir.is_dir():
            return {"ordered": [], "partial": [], "legacy": None}
        complete, partial = [], []
        for path in self.ckpt_dir.iterdir():
            if not path.is_dir() or not _ANY_TAG.match(path.name):
                continue
            manifest = integrity.read_manifest(path)
            if manifest is None:
                partial.append(path.name)
            else:
                complete.append((path.name, manifest))
        complete.sort(key=lambda item: integrity.order_key(item[1]), reverse=True)
        latest = self._latest_pointer()
        legacy = latest if not complete and latest in partial else None
        return {"ordered": complete, "partial": [] if legacy else partial, "legacy": legacy}

    def _remove_partial(self, partial: list[str], chosen: str | None) -> None:
        """Rank 0: remove manifest-less tag dirs written after ``chosen`` (crashed saves)."""
        since = (self.ckpt_dir / chosen / integrity.MANIFEST).stat().st_mtime if chosen else 0.0
        for name in partial:
            path = self.ckpt_dir / name
            if path.stat().st_mtime >= since:
                log.warning(
                    "checkpoint %s is incomplete (no manifest: its save was interrupted): removed",
                    name,
                )
                shutil.rmtree(path, ignore_errors=True)

    def load(self, ds_engine: Any, tag: str) -> TrainerState:
        """Restore engine + this rank's trainer state from ``tag``."""
        engine.load_checkpoint(ds_engine, self.ckpt_dir, tag)
        own = self.ckpt_dir / tag / f"trainer-rank{self.rank}.pt"
        fallback = self.ckpt_dir / tag / "trainer-rank0.pt"
        path = own if own.is_file() else fallback
        with torch.serialization.safe_globals(_LEGACY_RNG_GLOBALS):
            saved = torch.load(path, map_location="cpu", weights_only=True)
        state = TrainerState.from_saved(saved)
        if path is fallback and self.rank != 0:
            log.warning("no trainer state for rank %d in %s: RNG/loader re-derived", self.rank, tag)
            state.rng, state.loader = {}, {}
        restore_rng(state.rng)
        log.info("resumed from %s: epoch %d, step %d", tag, state.epoch, state.global_step)
        return state

    def _prune(self, *, keep_tag: str, best_tag: str) -> None:
        """Drop step checkpoints beyond ``keep`` and epoch-end ones beyond ``keep_epochs``
        (never the one just written nor the best; epoch exports stay in models/)."""
        names = [p.name for p in self.ckpt_dir.iterdir() if p.is_dir()]
        steps = sorted(n for n in names if _STEP_TAG.match(n))
        old = steps[: max(len(steps) - self.keep, 0)]
        if self.keep_epochs > 0:
            epochs = sorted(n for n in names if _EPOCH_TAG.match(n))
            old += epochs[: max(len(epochs) - self.keep_epochs, 0)]
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
        nbytes = sum(v.numel() * v.element_size() for v in state_dict.values())
        try:
            with explain_storage_errors(
                f"export of {tag}", dest, needed=nbytes, hint="Free some space and rerun"
            ):
                atomic_torch_save(payload, dest)
        except StorageError:
            dest.with_name(f".{dest.name}.tmp").unlink(missing_ok=True)  # nothing half-written
            raise
        log.info("exported %s -> %s", tag, dest)
        return dest

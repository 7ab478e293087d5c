"""The cache pass: the frozen teacher over every (training sample, view), once.

Work is cut into parts (one shard, a range of views; distill/logit_cache.py) and the parts into
workers: ranks under torchrun/srun, or ``--task-id/--num-tasks`` of a SLURM array. A worker
skips the parts that are complete on disk, computes the others in fixed batches that never
span two parts (so a part's bytes do not depend on where a pass was interrupted) and writes
each atomically. Whoever finds every part complete at its end writes the manifest.

Each batch is made exactly as the trainer makes it: the sampler's plan of those (sample, view)
pairs, the same ``PlannedSource`` (members read by byte range, never replaced by stand-ins)
and the same DALI graph, then the teacher behind its input adapter.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from cmkd_scale.config import Config
from cmkd_scale.data import TrainLoader
from cmkd_scale.data.pipeline import DaliRunner
from cmkd_scale.distill.logit_cache import (
    MANIFEST,
    CacheError,
    CacheInfo,
    Part,
    cache_key,
    encode,
    expected_parts,
    part_dtype,
    part_is_complete,
    teacher_identity,
    write_atomically,
    write_file_atomically,
)
from cmkd_scale.distill.teacher import build_teacher

log = logging.getLogger(__name__)

PASS_FILE = "pass.json"  # the pass's settings, written first: a rerun must match them


@dataclass(frozen=True)
class PassSettings:
    top_k: int = 0  # 0 = full logits
    views_per_part: int = 0  # 0 = all views of a shard in one part
    batch_size: int = 32
    worker: int = 0
    workers: int = 1


def run_pass(cfg: Config, out: Path, settings: PassSettings, device: torch.device) -> bool:
    """Compute this worker's missing parts; True when the cache is complete (manifest)."""
    views = cfg.data.views
    if views < 1:
        raise CacheError("data.views must be >= 1 for a teacher cache (--views V)")
    loader = TrainLoader(
        cfg.data,
        micro_batch=1,
        rank=0,
        world_size=1,
        seed=cfg.run.seed,
        device="gpu" if device.type == "cuda" else "cpu",
        exact=True,
    )
    try:
        shards = loader.shards
        shards.require_all_shards()
        sizes = [int(s["num_samples"]) for s in shards.shards]
        info = CacheInfo(
            key=cache_key(cfg, shards.shards, teacher_identity(cfg.teacher)),
            num_classes=shards.num_classes,
            top_k=settings.top_k,
            shard_sizes=sizes,
            views_per_part=settings.views_per_part or views,
            parts=[],
        )
        parts = expected_parts(sizes, views, info.views_per_part)
        info = CacheInfo(**{**info.__dict__, "parts": [p.name for p in parts]})
        _claim(out, info)
        dtype = part_dtype(info.num_classes, info.top_k)
        mine = [p for i, p in enumerate(parts) if i % settings.workers == settings.worker]
        todo = [p for p in mine if not _complete(out, p, sizes, dtype)]
        log.info(
            "teacher cache %s: %d parts (%d shards x %d views, %s); worker %d/%d owns %d, "
            "%d already complete",
            out,
            len(parts),
            len(sizes),
            views,
            f"top {info.top_k}" if info.top_k else "full logits",
            settings.worker,
            settings.workers,
            len(mine),
            len(mine) - len(todo),
        )
        if todo:
            teacher = build_teacher(
                cfg.teacher,
                num_classes=shards.num_classes,
                input_tdim=cfg.data.target_length,
                input_fdim=cfg.data.num_mel_bins,
                device=device,
                student=cfg.data,
            )
            assert teacher is not None, "teacher.arch is none"
            _compute(loader, teacher, todo, sizes, out, info, settings.batch_size)
    finally:
        loader.close()
    return finalize(out)


def finalize(out: Path) -> bool:
    """Write the manifest when every part is complete; True when the cache is finished."""
    claimed = CacheInfo.read_pass(out / PASS_FILE)
    dtype = part_dtype(claimed.num_classes, claimed.top_k)
    parts = expected_parts(claimed.shard_sizes, claimed.key.views, claimed.views_per_part)
    missing = [p.name for p in parts if not _complete(out, p, claimed.shard_sizes, dtype)]
    if missing:
        log.info(
            "teacher cache %s: %d of %d parts still missing (%s...): the last worker to finish "
            "writes the manifest",
            out,
            len(missing),
            len(parts),
            missing[0],
        )
        return False
    write_atomically_text(out / MANIFEST, claimed.to_json())
    log.info("teacher cache %s finished: %d parts, manifest written", out, len(parts))
    return True


def write_atomically_text(path: Path, text: str) -> None:
    write_file_atomically(path, lambda fh: fh.write(text.encode()))


def _claim(out: Path, info: CacheInfo) -> None:
    """Record the pass's settings, or check that a folder's earlier pass had the same."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / PASS_FILE
    if path.is_file():
        before = CacheInfo.read_pass(path)
        if before != info:
            wrong = before.key.mismatches(info.key) or [
                f"{k}: before {getattr(before, k)!r}, now {getattr(info, k)!r}"
                for k in ("num_classes", "top_k", "shard_sizes", "views_per_part")
                if getattr(before, k) != getattr(info, k)
            ]
            raise CacheError(
                f"{out} holds a cache pass with other settings ({'; '.join(wrong)}): use "
                "another --out, or delete the folder to start over"
            )
        return
    write_atomically_text(path, info.to_json())


def _complete(out: Path, part: Part, sizes: list[int], dtype: np.dtype) -> bool:
    views = part.view_stop - part.view_start
    return part_is_complete(out / part.name, sizes[part.shard], views, dtype)


def _pairs(part: Part, start: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A part's (sample, view) rows in file order: sample-major, its views in a row."""
    views = part.view_stop - part.view_start
    index = start + np.repeat(np.arange(size, dtype=np.int64), views)
    view = np.tile(np.arange(part.view_start, part.view_stop, dtype=np.int64), size)
    return index, view


def _compute(
    loader: TrainLoader,
    teacher: torch.nn.Module,
    todo: list[Part],
    sizes: list[int],
    out: Path,
    info: CacheInfo,
    batch_size: int,
) -> None:
    starts = np.cumsum([0, *sizes])
    pending: deque[tuple[Part, int, int]] = deque()  # (part, first row, real rows) per batch

    def batches():
        for part in todo:
            index, view = _pairs(part, int(starts[part.shard]), sizes[part.shard])
            for lo in range(0, len(index), batch_size):
                real = min(batch_size, len(index) - lo)
                take = np.minimum(np.arange(lo, lo + batch_size), len(index) - 1)  # pad: repeat
                pending.append((part, lo, real))
                yield loader.step_inputs(loader.sampler.view_plan(index[take], view[take]))

    feed = batches()
    part_rows = [sizes[p.shard] * (p.view_stop - p.view_start) for p in todo]
    total_batches = sum(-(-rows // batch_size) for rows in part_rows)
    total_rows = sum(part_rows)
    runner = DaliRunner(
        spec=loader.spec,
        device=loader.device,
        batch_size=batch_size,
        num_threads=loader.cfg.num_threads,
        prefetch=loader.cfg.prefetch,
        source=lambda: next(feed),
    )
    buffers: dict[Part, np.ndarray] = {}
    done_rows, t0, last = 0, time.monotonic(), time.monotonic()
    try:
        for _ in range(total_batches):
            fbank, _labels, _extras = runner.run()
            part, lo, real = pending.popleft()
            logits = teacher(fbank)[:real].float().cpu().numpy()
            views = part.view_stop - part.view_start
            rows = sizes[part.shard] * views
            buf = buffers.setdefault(part, np.empty((rows, info.num_classes), np.float32))
            buf[lo : lo + real] = logits
            done_rows += real
            if lo + real == rows:
                values = encode(buf.reshape(sizes[part.shard], views, -1), info.top_k)
                write_atomically(out / part.name, values)
                del buffers[part]
            now = time.monotonic()
            if now - last >= 10.0 or done_rows == total_rows:
                last = now
                rate = done_rows / max(now - t0, 1e-9)
                eta = timedelta(seconds=round((total_rows - done_rows) / max(rate, 1e-9)))
                log.info(
                    "teacher cache: %d/%d (sample, view) rows, %.1f rows/s, elapsed %s, ETA %s",
                    done_rows,
                    total_rows,
                    rate,
                    timedelta(seconds=round(now - t0)),
                    eta,
                )
    finally:
        runner.close()


def describe(out: Path) -> str:
    """One line on a finished cache (for the CLI's last output)."""
    info = json.loads((out / MANIFEST).read_text())
    size = sum(f.stat().st_size for f in out.glob("part-*.npy"))
    rows = sum(info["shard_sizes"]) * info["key"]["views"]
    return (
        f"teacher cache {out}: {sum(info['shard_sizes'])} clips x {info['key']['views']} views, "
        f"{'top ' + str(info['top_k']) if info['top_k'] else 'full logits'}, "
        f"{size / 1e6:.1f} MB ({size / max(rows, 1):.0f} bytes per clip per view)"
    )

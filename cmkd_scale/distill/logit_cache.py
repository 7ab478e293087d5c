"""A teacher-logit cache on disk: its files, its manifest, and reading it in a training step.

The cache pass (``python -m cmkd_scale.teacher_cache``) runs the frozen teacher once over every
(training sample, view) and stores the logits here; a student trained with ``teacher.cache``
reads them instead of running the teacher. A view's augmentation is a pure function of (seed,
sample, view) (``data.views``, data/sampler.py), so the cached logits are those of the very
input the student sees: CMKD's consistent teaching holds by construction.

Layout of a cache directory::

    part-000012-v000-004.npy   shard 12, views 0..3: one row per sample of the shard
    manifest.json              what the cache is bound to (CacheKey), its parts, its format

A part holds, per (sample, view), either the full logits (``float16 [n, views, C]``) or the top
K (a structured array: ``values`` float16 [K], ``indices`` int16 [K] and ``rest`` float16, the
mean of the other C - K logits). Read back, the classes outside the top K get ``rest``: the
mean keeps the sum of the logits, and every one of them is at most the K-th value (the KD
loss difference to full logits is measured by bench/bench_teacher_cache.py).

Parts are written to a temporary name and renamed: a killed pass leaves complete parts or
none, and a rerun computes only the missing ones. The manifest is written last, once every
part exists; a cache without one is unfinished and is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from cmkd_scale.config import Config, ConfigError, TeacherConfig

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
_PART = re.compile(r"^part-(\d{6})-v(\d{3})-(\d{3})\.npy$")


class CacheError(ConfigError):
    """A teacher cache that is unfinished, damaged or made for another run."""


@dataclass(frozen=True)
class CacheKey:
    """What a cache's logits depend on; a run may read a cache only with an equal key."""

    shards: str  # digest of the training manifest's shard list (names, sha256, sizes)
    teacher: str  # sha256 of the teacher's checkpoint file
    features: dict[str, Any]  # the student's data.* feature settings the teacher was fed
    augment: dict[str, Any]  # data.mixup / mixup_alpha / freqm / timem
    view_seed: int  # data.view_seed: the views' augmentation draws
    views: int  # data.views

    def mismatches(self, other: CacheKey) -> list[str]:
        """The fields that differ, each as 'field: cache X, run Y'."""
        mine, theirs = asdict(self), asdict(other)
        return [
            f"{name}: cache {mine[name]!r}, this run {theirs[name]!r}"
            for name in mine
            if mine[name] != theirs[name]
        ]


@dataclass(frozen=True)
class Part:
    """One file of the cache: the samples of one shard, a range of views."""

    shard: int
    view_start: int
    view_stop: int

    @property
    def name(self) -> str:
        return f"part-{self.shard:06d}-v{self.view_start:03d}-{self.view_stop:03d}.npy"

    @classmethod
    def parse(cls, name: str) -> Part | None:
        match = _PART.match(name)
        return cls(*(int(g) for g in match.groups())) if match else None


def shards_digest(shards: list[dict[str, Any]]) -> str:
    """A digest of a shard list (manifest entries): names, sha256 and sample counts."""
    rows = [[s["name"], s.get("sha256", ""), int(s["num_samples"])] for s in shards]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


FEATURE_KEYS = ("num_mel_bins", "target_length", "norm_mean", "norm_std")
AUGMENT_KEYS = ("mixup", "mixup_alpha", "freqm", "timem")


def teacher_identity(cfg: TeacherConfig) -> str:
    """The teacher a cache was made with: its checkpoint file's sha256 (or hub name)."""
    if not cfg.checkpoint:
        raise CacheError(
            "config key 'teacher.checkpoint' is empty: a teacher cache is made from a trained "
            "teacher; set teacher.checkpoint=PATH"
        )
    path = Path(cfg.checkpoint)
    return f"sha256:{file_sha256(path)}" if path.is_file() else cfg.checkpoint


def cache_key(cfg: Config, shard_list: list[dict[str, Any]], teacher: str) -> CacheKey:
    """The key of a cache for the run ``cfg`` on these shards (``teacher``: its identity)."""
    return CacheKey(
        shards=shards_digest(shard_list),
        teacher=teacher,
        features={k: getattr(cfg.data, k) for k in FEATURE_KEYS},
        augment={k: getattr(cfg.data, k) for k in AUGMENT_KEYS},
        view_seed=cfg.data.view_seed,
        views=cfg.data.views,
    )


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def part_dtype(num_classes: int, top_k: int) -> np.dtype:
    """One (sample, view) row: full fp16 logits, or the top K with the mean of the rest."""
    if top_k <= 0:
        return np.dtype((np.float16, (num_classes,)))
    return np.dtype([("values", np.float16, (top_k,)), ("indices", np.int16, (top_k,)),
                     ("rest", np.float16)])  # fmt: skip


def encode(logits: np.ndarray, top_k: int) -> np.ndarray:
    """``[..., C]`` float logits -> rows of ``part_dtype`` (shape ``[...]``)."""
    num_classes = logits.shape[-1]
    if top_k <= 0 or top_k >= num_classes:
        if top_k >= num_classes:
            raise ValueError(f"top_k {top_k} must be below the {num_classes} classes (0 = all)")
        return logits.astype(np.float16)
    flat = logits.reshape(-1, num_classes).astype(np.float32)
    order = np.argsort(-flat, axis=1, kind="stable")[:, :top_k]
    values = np.take_along_axis(flat, order, axis=1)
    rest = (flat.sum(axis=1) - values.sum(axis=1)) / (num_classes - top_k)
    rows = np.empty(len(flat), dtype=part_dtype(num_classes, top_k))
    rows["values"], rows["indices"], rows["rest"] = values, order, rest
    return rows.reshape(logits.shape[:-1])


def decode(rows: np.ndarray, num_classes: int, top_k: int) -> np.ndarray:
    """Rows of ``part_dtype`` -> float32 logits ``[..., C]`` (the rest filled, see above)."""
    if top_k <= 0:
        return np.asarray(rows, dtype=np.float32)
    shape = rows.shape
    rows = rows.reshape(-1)
    out = np.repeat(rows["rest"].astype(np.float32)[:, None], num_classes, axis=1)
    np.put_along_axis(out, rows["indices"].astype(np.int64), rows["values"].astype(np.float32), 1)
    return out.reshape(*shape, num_classes)


def write_file_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """``write`` into a temporary name in the same folder, fsync, rename. Workers may write
    the same file at once (the same bytes): each through its own temporary name."""
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_atomically(path: Path, array: np.ndarray) -> None:
    """A part: ``np.save`` through :func:`write_file_atomically`."""
    write_file_atomically(path, lambda fh: np.save(fh, array))


def part_is_complete(path: Path, rows: int, views: int, dtype: np.dtype) -> bool:
    """A part file exists with the expected shape and row type (written by this pass)."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    # a subarray row type (full logits) is stored as a trailing axis of its base type
    return array.shape == (rows, views, *dtype.shape) and array.dtype == dtype.base


@dataclass(frozen=True)
class CacheInfo:
    """The manifest: the key, the value format and the parts."""

    key: CacheKey
    num_classes: int
    top_k: int
    shard_sizes: list[int]
    views_per_part: int
    parts: list[str]
    format: int = FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def read(cls, folder: Path) -> CacheInfo:
        path = folder / MANIFEST
        if not path.is_file():
            raise CacheError(
                f"{folder} has no {MANIFEST}: the cache pass did not finish. Rerun "
                f"python -m cmkd_scale.teacher_cache with the same arguments (it computes only "
                "the missing parts and then writes the manifest)"
            )
        return cls.read_pass(path)

    @classmethod
    def read_pass(cls, path: Path) -> CacheInfo:
        """A manifest (or the cache pass's own record of its settings) from its JSON file."""
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise CacheError(f"{path}: format {data.get('format')!r}, this version reads {FORMAT}")
        data["key"] = CacheKey(**data["key"])
        return cls(**data)


def expected_parts(shard_sizes: list[int], views: int, views_per_part: int) -> list[Part]:
    """Every part a cache of these shards and views consists of, in order."""
    return [
        Part(shard, start, min(start + views_per_part, views))
        for shard in range(len(shard_sizes))
        for start in range(0, views, views_per_part)
    ]


class LogitCache:
    """The cached teacher logits of every (training sample, view), memory-mapped."""

    def __init__(
        self, folder: str | Path, expected: CacheKey | None = None, info: CacheInfo | None = None
    ) -> None:
        """``info``: the folder's manifest when the caller has read it already."""
        self.folder = Path(folder)
        self.info = info or CacheInfo.read(self.folder)
        if expected is not None:
            wrong = self.info.key.mismatches(expected)
            if wrong:
                raise CacheError(
                    f"teacher cache {self.folder} was made for another run: "
                    + "; ".join(wrong)
                    + ". Make a cache for this run (python -m cmkd_scale.teacher_cache with "
                    "this config) or set teacher.cache to the one that matches"
                )
        info = self.info
        self.starts = np.cumsum([0, *info.shard_sizes])
        dtype = part_dtype(info.num_classes, info.top_k)
        self._parts: dict[tuple[int, int], np.ndarray] = {}  # (shard, first view) -> rows
        for part in expected_parts(info.shard_sizes, info.key.views, info.views_per_part):
            path = self.folder / part.name
            rows, views = info.shard_sizes[part.shard], part.view_stop - part.view_start
            if not part_is_complete(path, rows, views, dtype):
                raise CacheError(
                    f"{path} is missing or damaged (expected {rows} x {views} rows of {dtype}); "
                    "delete it and rerun the cache pass, which recomputes only that part"
                )
            self._parts[(part.shard, part.view_start)] = np.load(path, mmap_mode="r")

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    def logits(self, index: np.ndarray, view: np.ndarray) -> np.ndarray:
        """float32 ``[B, C]`` logits of global sample ``index[i]`` under ``view[i]``."""
        index, view = np.asarray(index, dtype=np.int64), np.asarray(view, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= self.starts[-1]):
            raise IndexError(f"sample index outside 0..{self.starts[-1] - 1}")
        shard = np.searchsorted(self.starts, index, side="right") - 1
        first = view - view % self.info.views_per_part  # the first view of each row's part
        rows = [
            self._parts[(int(s), int(f))][int(i - self.starts[s]), int(v - f)]
            for i, s, v, f in zip(index, shard, view, first, strict=True)
        ]
        return decode(np.stack(rows), self.info.num_classes, self.info.top_k)


class CachedTeacher:
    """The trainer's teacher when ``teacher.cache`` is set: a lookup, no model."""

    def __init__(self, cache: LogitCache, device: torch.device) -> None:
        self.cache, self.device = cache, device
        self.last_ms = 0.0

    def __call__(self, index: torch.Tensor, view: torch.Tensor | None) -> torch.Tensor:
        """float32 ``[B, C]`` teacher logits of a training batch's samples and views."""
        if view is None:
            raise CacheError("a teacher cache needs data.views > 0 (each sample's view)")
        start = time.perf_counter()
        logits = self.cache.logits(index.cpu().numpy(), view.cpu().numpy())
        out = torch.from_numpy(logits).to(self.device)
        self.last_ms = (time.perf_counter() - start) * 1000.0
        return out


def open_cached_teacher(
    cfg: Config, shard_list: list[dict[str, Any]], device: torch.device
) -> CachedTeacher:
    """``teacher.cache`` checked against this run (shards, teacher, features, augmentation,
    view seed, views) and opened; without ``teacher.checkpoint`` the cache's teacher is taken."""
    folder = Path(cfg.teacher.cache)
    info = CacheInfo.read(folder)
    teacher = teacher_identity(cfg.teacher) if cfg.teacher.checkpoint else info.key.teacher
    cache = LogitCache(folder, cache_key(cfg, shard_list, teacher), info=info)
    log.info(
        "teacher logits from the cache %s (%s, %d views, teacher %s): the teacher is not built",
        folder,
        f"top {info.top_k}" if info.top_k else "full logits",
        info.key.views,
        info.key.teacher[:23],
    )
    return CachedTeacher(cache, device)

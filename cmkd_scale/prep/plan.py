"""Which segment goes to which shard, and which task builds which shard.

The written order is a seeded pseudo-random permutation of the concatenated, deduplicated
segment list (``--order-seed``; ``--keep-order``: input order), so every shard mixes classes
even when the list is sorted by label.  Shard j holds the segments at positions
[j*S, (j+1)*S) of the written order that have good audio, so the assignment never depends on
what failed elsewhere.  Shard j is built by task j % K.  The plan's fingerprint (settings,
order seed included, + the exact input files) is stored in ``plan.json`` and in every shard's
``.meta.json`` so outputs of different inputs or orders never mix.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

from . import audio_io
from .config import PlanError, PrepConfig
from .formats import read_inputs
from .segments import BadLine, ClassIndex, Segment

PLAN_FORMAT = "cmkd_scale.prep-plan/1"
PLAN_FILE = "plan.json"


def canonical_json(obj: object) -> bytes:
    """JSON bytes that are identical for identical content (no timestamps, fixed layout)."""
    return (json.dumps(obj, indent=1, ensure_ascii=True) + "\n").encode()


def written_order(keys: list[str], seed: int | None) -> list[int]:
    """Input positions in written order: sorted by a keyed BLAKE2b hash of each sample key.

    Depends only on the keys and the seed (not on numpy's RNG, not on the list's order), so
    every worker, task and rerun computes the same permutation; ``seed=None`` keeps input order.
    """
    if seed is None:
        return list(range(len(keys)))
    secret = seed.to_bytes(8, "little")
    ranks = [hashlib.blake2b(k.encode(), digest_size=8, key=secret).digest() for k in keys]
    return sorted(range(len(keys)), key=lambda i: (ranks[i], i))


@dataclass
class Plan:
    segments: list[Segment]  # in written order
    classes: ClassIndex
    sources: list[dict]
    bad_lines: list[BadLine]
    num_duplicates: int
    shard_size: int
    skip_bad_lines: bool
    input_format: str = "audioset"
    order_seed: int | None = None  # None: input order (--keep-order)
    selection: dict = field(default_factory=dict)  # --folds / --esc10 / --split in effect
    order: list[int] = field(default_factory=list)  # order[pos]: input position of segment pos

    @property
    def settings(self) -> dict:
        return {
            "sample_rate": audio_io.SAMPLE_RATE,
            "channels": 1,
            "flac_subtype": audio_io.FLAC_SUBTYPE,
            "resampler": audio_io.RESAMPLER,
            "cut_tolerance_s": audio_io.CUT_TOLERANCE_S,
            "shard_size": self.shard_size,
            "skip_bad_lines": self.skip_bad_lines,
            "class_index_sha256": self.classes.sha256,
            "input_format": self.input_format,
            "order_seed": self.order_seed,
            "selection": self.selection,
        }

    def input_position(self, pos: int) -> int:
        """Where the segment written at ``pos`` stood in the input (missing/failed.csv order)."""
        return self.order[pos] if self.order else pos

    @property
    def num_shards(self) -> int:
        return math.ceil(len(self.segments) / self.shard_size)

    @property
    def fingerprint(self) -> str:
        ident = {"format": PLAN_FORMAT, "settings": self.settings, "sources": self.sources}
        return hashlib.sha256(canonical_json(ident)).hexdigest()[:16]

    def shard_range(self, j: int) -> range:
        return range(j * self.shard_size, min((j + 1) * self.shard_size, len(self.segments)))

    def to_json(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "fingerprint": self.fingerprint,
            "num_segments": len(self.segments),
            "num_shards": self.num_shards,
            "num_classes": len(self.classes),
            "classes": self.classes.to_json(),
            "sources": self.sources,
            "settings": self.settings,
            "num_duplicates": self.num_duplicates,
            "bad_lines": [
                {"source": b.source, "line": b.line, "reason": b.reason} for b in self.bad_lines
            ],
        }


def make_plan(config: PrepConfig) -> Plan:
    """Parse the inputs of ``config`` (any --format) and fix the segment -> shard assignment."""
    classes, found = read_inputs(config)
    order = written_order([s.key for s in found.segments], config.order)
    selection = {
        name: value
        for name, value in (
            ("folds", list(config.folds) if config.folds is not None else None),
            ("esc10", config.esc10 or None),
            ("split", config.split),
        )
        if value is not None
    }
    return Plan(
        [found.segments[i] for i in order],
        classes,
        found.sources,
        found.bad_lines,
        found.num_duplicates,
        config.shard_size,
        config.skip_bad_lines,
        input_format=config.format,
        order_seed=config.order,
        selection=selection,
        order=order,
    )


def task_shards(num_shards: int, num_tasks: int, task_id: int) -> list[int]:
    """Shards built by task ``task_id`` of ``num_tasks``: j with j % K == I."""
    if num_tasks < 1 or not 0 <= task_id < num_tasks:
        raise PlanError(f"need 0 <= --task-id < --num-tasks, got task {task_id} of {num_tasks}")
    return list(range(task_id, num_shards, num_tasks))

"""Which segment goes to which shard, and which task builds which shard.

Shard j holds the segments at positions [j*S, (j+1)*S) of the concatenated, deduplicated list
that have good audio, so the assignment never depends on what failed elsewhere.  Shard j is
built by task j % K.  The plan's fingerprint (settings + the exact input files) is stored in
``plan.json`` and in every shard's ``.meta.json`` so outputs of different inputs never mix.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from . import audio_io
from .segments import BadLine, ClassIndex, Segment, SegmentList, read_class_index, read_segments

PLAN_FORMAT = "cmkd_scale.prep-plan/1"
PLAN_FILE = "plan.json"


class PlanError(ValueError):
    """The output already holds a different plan, or the task split is invalid."""


def canonical_json(obj: object) -> bytes:
    """JSON bytes that are identical for identical content (no timestamps, fixed layout)."""
    return (json.dumps(obj, indent=1, ensure_ascii=True) + "\n").encode()


@dataclass
class Plan:
    segments: list[Segment]
    classes: ClassIndex
    sources: list[dict]
    bad_lines: list[BadLine]
    num_duplicates: int
    shard_size: int
    skip_bad_lines: bool

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
        }

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


def make_plan(
    segment_csvs: list[Path], class_labels: Path, *, shard_size: int, skip_bad_lines: bool
) -> Plan:
    """Parse the inputs and fix the segment -> shard assignment."""
    if shard_size < 1:
        raise PlanError(f"--shard-size must be >= 1, got {shard_size}")
    classes = read_class_index(Path(class_labels))
    found: SegmentList = read_segments(
        [Path(p) for p in segment_csvs], classes, skip_bad_lines=skip_bad_lines
    )
    return Plan(
        found.segments,
        classes,
        found.sources,
        found.bad_lines,
        found.num_duplicates,
        shard_size,
        skip_bad_lines,
    )


def task_shards(num_shards: int, num_tasks: int, task_id: int) -> list[int]:
    """Shards built by task ``task_id`` of ``num_tasks``: j with j % K == I."""
    if num_tasks < 1 or not 0 <= task_id < num_tasks:
        raise PlanError(f"need 0 <= --task-id < --num-tasks, got task {task_id} of {num_tasks}")
    return list(range(task_id, num_shards, num_tasks))

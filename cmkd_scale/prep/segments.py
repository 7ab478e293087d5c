"""Google's AudioSet segment CSVs and the class index, parsed exactly as published.

Segment CSV: three ``#`` header lines, then ``YTID, start_seconds, end_seconds, "mid1,mid2"``.
Class index: ``index,mid,display_name`` with a header row; display names may hold quoted commas.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_MAX_ID_CHARS = 48  # keeps "<id>_<ms>.labels" far below the 100-byte ustar name limit


class SegmentsError(ValueError):
    """A segment CSV or the class index holds a line we cannot use."""


@dataclass(frozen=True)
class AudioClass:
    index: int
    mid: str  # AudioSet / FSD50K machine id; "" where the dataset has none
    display_name: str
    target: int | None = None  # ESC-50's own class number (esc50 only)


@dataclass(frozen=True)
class ClassIndex:
    """The label vocabulary: class ``index`` <-> AudioSet ``mid`` (and <-> name)."""

    classes: tuple[AudioClass, ...]
    by_mid: dict[str, int] = field(compare=False, repr=False)
    sha256: str
    by_name: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(cls, classes: list[AudioClass], sha256: str) -> ClassIndex:
        """Index ``classes`` (already numbered 0..C-1) by MID and by display name."""
        by_mid = {c.mid: c.index for c in classes if c.mid}
        by_name = {c.display_name: c.index for c in classes}
        return cls(tuple(classes), by_mid, sha256, by_name)

    def __len__(self) -> int:
        return len(self.classes)

    def to_json(self) -> list[dict]:
        out = []
        for c in self.classes:
            entry = {"index": c.index, "mid": c.mid, "display_name": c.display_name}
            if c.target is not None:
                entry["target"] = c.target
            out.append(entry)
        return out


@dataclass(frozen=True, slots=True)
class Segment:
    """One row of a segment CSV, with its labels resolved to class indices."""

    key: str
    ytid: str  # AudioSet: the YouTube id; other formats: the clip id (file name without ext)
    start: float
    end: float | None  # None: the whole file (every format but AudioSet)
    mids: tuple[str, ...]
    labels: tuple[int, ...]
    source: str  # CSV file name
    line: int  # 1-based line number in that file
    # other formats: (name, preferred extension) pairs to look up, best first (locate.py);
    # empty for AudioSet, whose files are found by YTID and times
    lookup: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class BadLine:
    source: str
    line: int
    reason: str


@dataclass
class SegmentList:
    """Concatenated, deduplicated segments of all CSVs, plus what was skipped."""

    segments: list[Segment]
    sources: list[dict]
    bad_lines: list[BadLine]
    num_duplicates: int


def safe_id(name: str) -> str:
    """``name`` using only ``[A-Za-z0-9_-]`` (no ``.``, no ``/``), so no path can escape.

    A name with other characters (or an oversized one) is rewritten and suffixed with a hash
    of the original, so two different hostile names cannot collide.
    """
    safe = _UNSAFE.sub("-", name)
    if safe != name or len(safe) > _MAX_ID_CHARS:
        digest = hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()[:10]
        safe = f"{safe[: _MAX_ID_CHARS - 11]}-{digest}"
    return safe


def make_key(ytid: str, start_ms: int) -> str:
    """AudioSet sample key ``{ytid}_{start_ms}`` with the YTID made safe by ``safe_id``."""
    return f"{safe_id(ytid)}_{start_ms}"


def seconds_to_ms(seconds: float) -> int:
    return round(seconds * 1000)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_class_index(path: Path) -> ClassIndex:
    path = Path(path)
    if not path.is_file():
        raise SegmentsError(f"class index {path} does not exist (pass --class-labels)")
    classes: list[AudioClass] = []
    by_mid: dict[str, int] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != ["index", "mid", "display_name"]:
            raise SegmentsError(
                f"{path}:1: expected the header 'index,mid,display_name', got {header!r}"
            )
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not row:
                continue
            if len(row) != 3:
                raise SegmentsError(
                    f"{where}: expected 3 fields (index,mid,display_name), got {row!r}"
                )
            try:
                index = int(row[0])
            except ValueError:
                raise SegmentsError(f"{where}: index {row[0]!r} is not an integer") from None
            if index != len(classes):
                raise SegmentsError(f"{where}: index {index} out of order, expected {len(classes)}")
            mid = row[1].strip()
            if not mid or mid in by_mid:
                raise SegmentsError(f"{where}: MID {mid!r} is empty or repeated")
            by_mid[mid] = index
            classes.append(AudioClass(index, mid, row[2]))
    if not classes:
        raise SegmentsError(f"{path}: no classes listed")
    return ClassIndex.build(classes, file_sha256(path))


def read_class_index(path: Path) -> ClassIndex:
    """Read ``class_labels_indices.csv``; indices must be 0..C-1 in order, MIDs unique."""
    try:
        return _read_class_index(Path(path))
    except UnicodeDecodeError as exc:
        raise SegmentsError(f"class index {path} is not UTF-8 text ({exc})") from None


def _parse_row(row: list[str], classes: ClassIndex) -> tuple[str, float, float, tuple[str, ...]]:
    """Fields of one data row, or ValueError saying what is wrong with it."""
    if len(row) != 4:
        raise ValueError(
            f"expected 4 fields 'YTID, start_seconds, end_seconds, \"mid1,mid2\"', got {len(row)}"
        )
    ytid = row[0].strip()
    if not ytid:
        raise ValueError("empty YTID")
    try:
        start, end = float(row[1]), float(row[2])
    except ValueError:
        raise ValueError(f"start/end {row[1]!r}, {row[2]!r} are not numbers") from None
    if not (math.isfinite(start) and math.isfinite(end)) or start < 0 or end <= start:
        raise ValueError(f"need 0 <= start < end, got start={row[1]!r} end={row[2]!r}")
    mids = tuple(dict.fromkeys(m.strip() for m in row[3].split(",") if m.strip()))
    if not mids:
        raise ValueError("no labels")
    unknown = [m for m in mids if m not in classes.by_mid]
    if unknown:
        raise ValueError(f"unknown MID {unknown[0]!r} (not in the class index)")
    return ytid, start, end, mids


def read_segment_csv(
    path: Path, classes: ClassIndex, *, skip_bad_lines: bool, bad_lines: list[BadLine]
) -> list[Segment]:
    """Rows of one segment CSV in file order; bad rows raise, or are appended to ``bad_lines``."""
    path = Path(path)
    if not path.is_file():
        raise SegmentsError(f"segment CSV {path} does not exist (check --segments)")
    segments: list[Segment] = []
    # undecodable bytes become U+FFFD: such a YTID is then reported missing, with its line
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        reader = csv.reader(f, skipinitialspace=True)
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()) or row[0].startswith("#"):
                continue
            try:
                ytid, start, end, mids = _parse_row(row, classes)
            except ValueError as exc:
                line = reader.line_num
                if not skip_bad_lines:
                    raise SegmentsError(
                        f"{path}:{line}: {exc}; fix the line or pass --skip-bad-lines"
                    ) from None
                bad_lines.append(BadLine(path.name, line, str(exc)))
                continue
            labels = tuple(classes.by_mid[m] for m in mids)
            key = make_key(ytid, seconds_to_ms(start))
            segments.append(
                Segment(key, ytid, start, end, mids, labels, path.name, reader.line_num)
            )
    return segments


def read_segments(
    paths: list[Path],
    classes: ClassIndex,
    *,
    skip_bad_lines: bool = False,
    reader: Callable[..., list[Segment]] = read_segment_csv,
) -> SegmentList:
    """Concatenate the CSVs in the given order and drop repeated keys (first one wins).

    ``reader(path, classes, skip_bad_lines=, bad_lines=)`` reads one file (default: an AudioSet
    segment CSV; formats.py has the others)."""
    if not paths:
        raise SegmentsError("no segment CSV given (pass --segments CSV)")
    bad: list[BadLine] = []
    seen: set[str] = set()
    out: list[Segment] = []
    sources = []
    duplicates = 0
    for path in paths:
        rows = reader(path, classes, skip_bad_lines=skip_bad_lines, bad_lines=bad)
        for seg in rows:
            if seg.key in seen:
                duplicates += 1
                continue
            seen.add(seg.key)
            out.append(seg)
        sources.append(
            {"name": Path(path).name, "sha256": file_sha256(Path(path)), "rows": len(rows)}
        )
        log.info("read %d segments from %s", len(rows), path)
    if bad:
        log.warning(
            "skipped %d bad lines (first: %s:%d: %s)",
            len(bad),
            bad[0].source,
            bad[0].line,
            bad[0].reason,
        )
    if duplicates:
        log.warning("dropped %d repeated segments (same key: YTID and start, or file)", duplicates)
    return SegmentList(out, sources, bad, duplicates)

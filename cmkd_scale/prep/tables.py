"""Headed CSV tables of the non-AudioSet formats: rows with line numbers, parsing that names
``FILE:LINE`` (or records the row under ``--skip-bad-lines``), whole-file segments."""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from pathlib import Path

from .segments import BadLine, Segment, SegmentsError, safe_id


def open_table(path: Path, what: str) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    """Header and (line, row) pairs of a headed CSV; blank rows skipped."""
    path = Path(path)
    if not path.is_file():
        raise SegmentsError(f"{what} {path} does not exist (check --segments)")

    def rows() -> Iterator[tuple[int, list[str]]]:
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
            reader = csv.reader(f)
            next(reader, None)
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                yield reader.line_num, row

    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        header = [h.strip() for h in next(csv.reader(f), [])]
    return header, rows()


def collect(
    path: Path,
    rows: Iterator[tuple[int, list[str]]],
    parse: Callable[[list[str]], Segment | None],
    *,
    skip_bad_lines: bool,
    bad_lines: list[BadLine],
) -> list[Segment]:
    """Parse rows; a bad one raises naming file:line, or is recorded with --skip-bad-lines.
    ``parse`` returns None for a good row that the options leave out (--folds, --split)."""
    out = []
    for line, row in rows:
        try:
            seg = parse(row)
        except ValueError as exc:
            if not skip_bad_lines:
                raise SegmentsError(
                    f"{path}:{line}: {exc}; fix the line or pass --skip-bad-lines"
                ) from None
            bad_lines.append(BadLine(Path(path).name, line, str(exc)))
            continue
        if seg is not None:
            out.append(at_line(seg, Path(path).name, line))
    return out


def at_line(seg: Segment, source: str, line: int) -> Segment:
    return Segment(
        seg.key, seg.ytid, seg.start, seg.end, seg.mids, seg.labels, source, line, seg.lookup
    )


def whole_file(
    clip_id: str, labels: tuple[int, ...], mids: tuple[str, ...], lookup: tuple
) -> Segment:
    return Segment(safe_id(clip_id), clip_id, 0.0, None, mids, labels, "", 0, lookup)


def split_ext(name: str) -> tuple[str, str]:
    """('dir/a', 'wav') for 'dir/a.wav'; the extension lower-case, '' when there is none."""
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem or "/" in ext:
        return name, ""
    return stem, ext.lower()

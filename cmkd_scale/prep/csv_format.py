"""``--format csv``: any dataset as ``file,labels[,fold]`` rows and a list of class names."""

from __future__ import annotations

import csv
import posixpath
from pathlib import Path
from typing import TYPE_CHECKING

from .segments import (
    AudioClass,
    ClassIndex,
    Segment,
    SegmentList,
    SegmentsError,
    file_sha256,
    read_segments,
)
from .tables import collect, open_table, split_ext, whole_file

if TYPE_CHECKING:
    from .config import PrepConfig

CSV_REQUIRED = ("file", "labels")


def read_class_names(path: Path) -> ClassIndex:
    """Class names for --format csv: one name per line, or a CSV whose header row has a
    ``name`` or ``display_name`` column (``display_name`` wins; optional ``index`` must count
    0..C-1, optional ``mid`` is recorded) -- AudioSet's class_labels_indices.csv works too."""
    path = Path(path)
    if not path.is_file():
        raise SegmentsError(f"class list {path} does not exist (pass --class-labels)")
    with open(path, newline="", encoding="utf-8-sig") as f:
        text = f.read()
    lines = text.splitlines()
    first = next(csv.reader(lines[:1]), []) if lines else []
    header = [h.strip() for h in first]
    classes: list[AudioClass] = []

    def add(name: str, mid: str, where: str) -> None:
        if not name:
            raise SegmentsError(f"{where}: empty class name")
        if any(c.display_name == name for c in classes):
            raise SegmentsError(f"{where}: class name {name!r} is repeated")
        classes.append(AudioClass(len(classes), mid, name))

    if "name" in header or "display_name" in header:
        column = header.index("display_name" if "display_name" in header else "name")
        reader = csv.reader(lines[1:])
        for row in reader:
            line = reader.line_num + 1
            if not row:
                continue
            where = f"{path}:{line}"
            if len(row) != len(header):
                raise SegmentsError(f"{where}: expected {len(header)} fields, got {row!r}")
            if "index" in header and row[header.index("index")].strip() != str(len(classes)):
                raise SegmentsError(
                    f"{where}: index {row[header.index('index')]!r} out of order, expected "
                    f"{len(classes)}"
                )
            mid = row[header.index("mid")].strip() if "mid" in header else ""
            add(row[column].strip(), mid, where)
    else:
        for i, raw in enumerate(lines, start=1):
            if raw.strip():
                add(raw.strip(), "", f"{path}:{i}")
    if not classes:
        raise SegmentsError(f"{path}: no classes listed")
    return ClassIndex.build(classes, file_sha256(path))


def match_names(text: str, by_name: dict[str, int]) -> list[int]:
    """Class indices of a comma-separated list of names; a name may itself hold commas
    (AudioSet's "Male speech, man speaking"): the longest name that matches is taken."""
    parts = text.split(",")
    out, i = [], 0
    while i < len(parts):
        if not parts[i].strip():
            i += 1
            continue
        for j in range(len(parts), i, -1):
            name = ",".join(parts[i:j]).strip()
            if name in by_name:
                out.append(by_name[name])
                i = j
                break
        else:
            raise ValueError(f"unknown label {parts[i].strip()!r} (not in --class-labels)")
    return out


def _relative(file: str) -> str:
    """A normalized relative POSIX path, or ValueError for one that leaves --audio-dir."""
    if not file:
        raise ValueError("empty file")
    if file.startswith(("/", "\\")) or (len(file) > 1 and file[1] == ":"):
        raise ValueError(f"file {file!r} is absolute: give it relative to --audio-dir")
    norm = posixpath.normpath(file)
    if norm == ".." or norm.startswith("../"):
        raise ValueError(f"file {file!r} leaves --audio-dir")
    return norm


def read_csv_format(config: PrepConfig) -> tuple[ClassIndex, SegmentList]:
    """Any dataset: ``file,labels[,fold]`` rows (other columns are ignored)."""
    index = read_class_names(config.class_labels)
    folds = set(config.folds) if config.folds is not None else None

    def reader(path: Path, classes, *, skip_bad_lines: bool, bad_lines: list) -> list[Segment]:
        header, rows = open_table(path, "segment list")
        if not all(c in header for c in CSV_REQUIRED) or len(set(header)) != len(header):
            raise SegmentsError(
                f"{path}:1: expected a header with columns 'file,labels' (and optionally "
                f"'fold'), got {','.join(header)!r}"
            )
        col = {name: header.index(name) for name in (*CSV_REQUIRED, "fold") if name in header}
        if folds is not None and "fold" not in col:
            raise SegmentsError(f"{path}: --folds needs a 'fold' column, the header has none")

        def parse(row: list[str]) -> Segment | None:
            if len(row) != len(header):
                raise ValueError(f"expected {len(header)} fields ({','.join(header)}), "
                                 f"got {len(row)}")  # fmt: skip
            rel = _relative(row[col["file"]].strip())
            labels = tuple(dict.fromkeys(match_names(row[col["labels"]], classes.by_name)))
            if not labels:
                raise ValueError("no labels")
            if "fold" in col:
                try:
                    fold = int(row[col["fold"]])
                except ValueError:
                    raise ValueError(f"fold {row[col['fold']]!r} is not an integer") from None
                if folds is not None and fold not in folds:
                    return None
            stem, ext = split_ext(rel)
            mids = tuple(m for m in (classes.classes[i].mid for i in labels) if m)
            return whole_file(stem, labels, mids, ((stem, ext),))

        return collect(path, rows, parse, skip_bad_lines=skip_bad_lines, bad_lines=bad_lines)

    found = read_segments(
        list(config.segments), index, skip_bad_lines=config.skip_bad_lines, reader=reader
    )
    return index, found

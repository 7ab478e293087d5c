"""``--format``: the published metadata of each dataset -> class index + segment list.

=========  ======================================  ===========================================
format     --segments                              --class-labels
=========  ======================================  ===========================================
audioset   Google's segment CSVs (segments.py)     class_labels_indices.csv
esc50      meta/esc50.csv (``filename,fold,target,  none: classes are target/category
           category,esc10,src_file,take``)
fsd50k     FSD50K.ground_truth/dev.csv or eval.csv  FSD50K.ground_truth/vocabulary.csv (no
           (``fname,labels,mids[,split]``)          header: ``index,name,mid``)
csv        ``file,labels[,fold]``                   class names: one per line, or a CSV whose
                                                   header has ``name`` or ``display_name``
=========  ======================================  ===========================================

Every format but AudioSet takes the whole audio file (clips of 5 s, 0.3-30 s, any length) and
finds it by file name (``Segment.lookup``); its sample key is the file name without extension,
made safe by ``safe_id``.  A malformed row stops prep with ``FILE:LINE: what is wrong`` unless
``--skip-bad-lines`` (then it is counted in bad_lines.csv), exactly as for AudioSet.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING

from .csv_format import read_csv_format
from .segments import (
    AudioClass,
    ClassIndex,
    Segment,
    SegmentList,
    SegmentsError,
    file_sha256,
    read_class_index,
    read_segments,
)
from .tables import collect, open_table, split_ext, whole_file

if TYPE_CHECKING:
    from .config import PrepConfig

ESC50_HEADER = ["filename", "fold", "target", "category", "esc10", "src_file", "take"]
FSD50K_HEADERS = (["fname", "labels", "mids"], ["fname", "labels", "mids", "split"])
_BOOL = {"true": True, "false": False}


def _classes_sha256(classes: list[AudioClass]) -> str:
    """Fingerprint of a class list that comes from the segment CSV itself (ESC-50)."""
    data = json.dumps([[c.index, c.mid, c.display_name, c.target] for c in classes])
    return hashlib.sha256(data.encode()).hexdigest()


# ---------------------------------------------------------------------------------- ESC-50


def _esc50_fields(row: list[str]) -> tuple[str, int, int, str, bool, str, str]:
    if len(row) != len(ESC50_HEADER):
        raise ValueError(f"expected {len(ESC50_HEADER)} fields ({','.join(ESC50_HEADER)}), "
                         f"got {len(row)}")  # fmt: skip
    filename, fold, target, category, esc10, src_file, take = (x.strip() for x in row)
    if not filename or "/" in filename or "\\" in filename:
        raise ValueError(f"filename {filename!r} must be a plain file name like 1-100032-A-0.wav")
    try:
        fold_n, target_n = int(fold), int(target)
    except ValueError:
        raise ValueError(f"fold {fold!r} / target {target!r} are not integers") from None
    if target_n < 0:
        raise ValueError(f"target {target_n} is negative")
    if not category:
        raise ValueError("empty category")
    if esc10.lower() not in _BOOL:
        raise ValueError(f"esc10 is {esc10!r}, expected True or False")
    return filename, fold_n, target_n, category, _BOOL[esc10.lower()], src_file, take


def read_esc50(config: PrepConfig) -> tuple[ClassIndex, SegmentList]:
    """ESC-50's meta/esc50.csv (or several): classes are the distinct targets, in target order
    (the full release: index == target, 50 classes; --esc10: the 10 ESC-10 targets, renumbered
    0..9); --folds and --esc10 select rows.  Classes come from every row, whatever --folds
    selects, so train and eval folds share one class index."""
    parsed: list[list[tuple[int, list[str], tuple | None, str | None]]] = []  # per CSV
    categories: dict[int, tuple[str, str]] = {}  # target -> (category, where first seen)
    for path in config.segments:
        header, rows = open_table(path, "ESC-50 CSV")
        if header != ESC50_HEADER:
            raise SegmentsError(
                f"{path}:1: expected ESC-50's header '{','.join(ESC50_HEADER)}', got "
                f"{','.join(header)!r} (--format esc50 reads meta/esc50.csv as published)"
            )
        entries: list = []
        parsed.append(entries)
        for line, row in rows:
            try:
                fields = _esc50_fields(row)
            except ValueError as exc:
                entries.append((line, row, None, str(exc)))
                continue
            _, _, target, category, _, _, _ = fields
            seen = categories.get(target)
            error = None
            if seen is None:
                categories[target] = (category, f"{Path(path).name}:{line}")
            elif seen[0] != category:
                error = f"target {target} is {category!r} here but {seen[0]!r} at {seen[1]}"
            entries.append((line, row, fields, error))
    wanted = {
        f[2] for rows in parsed for _, _, f, err in rows if f and not err and f[4]
    } if config.esc10 else set(categories)  # fmt: skip
    if not wanted:
        raise SegmentsError(
            f"{config.segments[0]}: no {'ESC-10 ' if config.esc10 else ''}rows to take classes "
            "from (check --segments)"
        )
    classes = [AudioClass(i, "", categories[t][0], target=t) for i, t in enumerate(sorted(wanted))]
    index = ClassIndex.build(classes, _classes_sha256(classes))
    by_target = {c.target: c.index for c in classes}
    folds = set(config.folds) if config.folds is not None else None
    pending = deque(parsed)  # read_segments calls reader once per CSV, in this order

    def reader(path: Path, _classes, *, skip_bad_lines: bool, bad_lines: list) -> list[Segment]:
        def parse(entry: list) -> Segment | None:
            _, fields, error = entry
            if error:
                raise ValueError(error)
            filename, fold, target, _, esc10, src_file, take = fields
            if (folds is not None and fold not in folds) or (config.esc10 and not esc10):
                return None
            stem, ext = split_ext(filename)
            lookup = ((stem, ext), (f"{fold}-{src_file}-{take}", ""))  # 2015 release naming
            return whole_file(stem, (by_target[target],), (), lookup)

        rows = ((line, [row, f, err]) for line, row, f, err in pending.popleft())
        return collect(path, rows, parse, skip_bad_lines=skip_bad_lines, bad_lines=bad_lines)

    found = read_segments(
        list(config.segments), index, skip_bad_lines=config.skip_bad_lines, reader=reader
    )
    return index, found


# ---------------------------------------------------------------------------------- FSD50K


def read_fsd50k_vocabulary(path: Path) -> ClassIndex:
    """FSD50K.ground_truth/vocabulary.csv: no header, rows ``index,name,mid`` (0..199)."""
    path = Path(path)
    if not path.is_file():
        raise SegmentsError(f"vocabulary {path} does not exist (pass --class-labels)")
    classes: list[AudioClass] = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not row:
                continue
            if reader.line_num == 1 and [x.strip() for x in row] == ["index", "name", "mid"]:
                continue  # tolerated, though the published file has no header
            if len(row) != 3:
                raise SegmentsError(f"{where}: expected 3 fields (index,name,mid), got {row!r}")
            try:
                index = int(row[0])
            except ValueError:
                raise SegmentsError(
                    f"{where}: index {row[0]!r} is not an integer (FSD50K's vocabulary.csv has "
                    "no header: rows are index,name,mid)"
                ) from None
            if index != len(classes):
                raise SegmentsError(f"{where}: index {index} out of order, expected {len(classes)}")
            name, mid = row[1].strip(), row[2].strip()
            if not name or any(c.display_name == name for c in classes):
                raise SegmentsError(f"{where}: class name {name!r} is empty or repeated")
            classes.append(AudioClass(index, mid, name))
    if not classes:
        raise SegmentsError(f"{path}: no classes listed")
    return ClassIndex.build(classes, file_sha256(path))


def read_fsd50k(config: PrepConfig) -> tuple[ClassIndex, SegmentList]:
    """FSD50K ground truth (dev.csv or eval.csv); --split train|val selects dev.csv rows."""
    index = read_fsd50k_vocabulary(config.class_labels)

    def reader(path: Path, classes, *, skip_bad_lines: bool, bad_lines: list) -> list[Segment]:
        header, rows = open_table(path, "FSD50K ground-truth CSV")
        if header not in FSD50K_HEADERS:
            raise SegmentsError(
                f"{path}:1: expected FSD50K's header 'fname,labels,mids[,split]', got "
                f"{','.join(header)!r} (pass FSD50K.ground_truth/dev.csv or eval.csv)"
            )
        has_split = len(header) == 4
        if config.split is not None and not has_split:
            raise SegmentsError(
                f"{path}: has no split column (eval.csv?); --split {config.split} selects rows "
                "of dev.csv: leave --split out for eval.csv"
            )

        def parse(row: list[str]) -> Segment | None:
            if len(row) != len(header):
                raise ValueError(f"expected {len(header)} fields ({','.join(header)}), "
                                 f"got {len(row)}")  # fmt: skip
            fname = row[0].strip()
            if not fname:
                raise ValueError("empty fname")
            names = [n.strip() for n in row[1].split(",") if n.strip()]
            if not names:
                raise ValueError("no labels")
            unknown = [n for n in names if n not in classes.by_name]
            if unknown:
                raise ValueError(f"unknown label {unknown[0]!r} (not in {config.class_labels})")
            labels = tuple(dict.fromkeys(classes.by_name[n] for n in names))
            mids = tuple(classes.classes[i].mid for i in labels)
            listed = {m.strip() for m in row[2].split(",") if m.strip()}
            if listed != set(mids):
                raise ValueError(
                    f"mids {sorted(listed)} do not match the labels' MIDs {sorted(mids)} in "
                    f"{config.class_labels} (ground truth and vocabulary of different releases?)"
                )
            if has_split:
                split = row[3].strip()
                if split not in ("train", "val"):
                    raise ValueError(f"split {split!r} is neither train nor val")
                if config.split is not None and split != config.split:
                    return None
            return whole_file(fname, labels, mids, ((fname, "wav"),))

        return collect(path, rows, parse, skip_bad_lines=skip_bad_lines, bad_lines=bad_lines)

    found = read_segments(
        list(config.segments), index, skip_bad_lines=config.skip_bad_lines, reader=reader
    )
    return index, found


def read_inputs(config: PrepConfig) -> tuple[ClassIndex, SegmentList]:
    """The class index and the concatenated, deduplicated, selected segments of ``config``."""
    readers = {"esc50": read_esc50, "fsd50k": read_fsd50k, "csv": read_csv_format}
    if config.format in readers:
        try:
            return readers[config.format](config)
        except UnicodeDecodeError as exc:  # the segment lists are read with errors="replace"
            raise SegmentsError(
                f"--class-labels {config.class_labels} is not UTF-8 text ({exc})"
            ) from None
    classes = read_class_index(config.class_labels)
    found = read_segments(list(config.segments), classes, skip_bad_lines=config.skip_bad_lines)
    return classes, found

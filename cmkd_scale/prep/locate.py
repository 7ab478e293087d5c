"""Find each segment's audio file under --audio-dir with one recursive scan.

Downloaders name files ``{YTID}.{ext}``, ``{YTID}_{start}.{ext}`` or
``{YTID}_{start}_{end}.{ext}``, with times written as seconds (``30``, ``30.0``, ``30.000``) or
milliseconds (``30000``).  YTIDs may themselves contain ``_``, so every reading of a stem is
indexed and the lookup decides which one the segment matches.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from .segments import Segment, seconds_to_ms

log = logging.getLogger(__name__)

# Preference when one segment has files in several formats: lossless first.
AUDIO_EXTENSIONS = ("flac", "wav", "opus", "ogg", "oga", "m4a", "aac", "mp3", "webm", "mp4", "mkv")
_RANK = {ext: i for i, ext in enumerate(AUDIO_EXTENSIONS)}
_TIME = re.compile(r"\d+(?:\.\d+)?")


@dataclass(frozen=True, slots=True)
class _Candidate:
    start: str | None  # time token as written in the name
    end: str | None
    rank: int  # 0 = full match wanted first; see AudioIndex.find
    ext_rank: int
    path: str


def _time_matches(token: str, seconds: float) -> bool:
    """``30``/``30.0``/``30.000`` match 30 s; an integer also matches as milliseconds."""
    ms = seconds_to_ms(seconds)
    if "." in token:
        return seconds_to_ms(float(token)) == ms
    value = int(token)
    return value == ms or value * 1000 == ms


class AudioIndex:
    """YTID -> candidate files, built from a single ``os.scandir`` walk."""

    def __init__(self, root: Path, *, by_path: bool = False) -> None:
        self.root = Path(root)
        self._by_ytid: dict[str, list[_Candidate]] = defaultdict(list)
        # --format csv: relative path without extension -> candidates (only built for it)
        self._by_path: dict[str, list[_Candidate]] | None = defaultdict(list) if by_path else None
        self.num_files = 0

    @classmethod
    def scan(cls, root: Path, *, by_path: bool = False) -> AudioIndex:
        """Walk ``root`` recursively once and index every file with an audio extension
        (``by_path``: also under its path relative to ``root``, for ``find_named``)."""
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"audio dir {root} does not exist (check --audio-dir)")
        index = cls(root, by_path=by_path)
        t0 = time.monotonic()
        stack = [str(root)]
        while stack:
            folder = stack.pop()
            try:
                entries = list(os.scandir(folder))
            except OSError as exc:
                log.warning("cannot list %s (%s); its files are treated as missing", folder, exc)
                continue
            for entry in entries:
                if entry.is_dir(follow_symlinks=True):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=True):
                    index.add(entry.path)
        log.info(
            "indexed %d audio files under %s in %.1f s",
            index.num_files,
            root,
            time.monotonic() - t0,
        )
        return index

    def add(self, path: str) -> None:
        """Index one file under every reading of its name."""
        name = os.path.basename(path)
        stem, dot, ext = name.rpartition(".")
        ext = ext.lower()
        if not dot or not stem or ext not in _RANK:
            return
        self.num_files += 1
        ext_rank = _RANK[ext]
        self._by_ytid[stem].append(_Candidate(None, None, 2, ext_rank, path))
        if self._by_path is not None:
            rel = self.relative(path).rpartition(".")[0]
            self._by_path[rel].append(_Candidate(None, None, 2, ext_rank, path))
        head, _, last = stem.rpartition("_")
        if head and _TIME.fullmatch(last):
            self._by_ytid[head].append(_Candidate(last, None, 1, ext_rank, path))
            head2, _, middle = head.rpartition("_")
            if head2 and _TIME.fullmatch(middle):
                self._by_ytid[head2].append(_Candidate(middle, last, 0, ext_rank, path))

    def find(self, segment: Segment) -> str | None:
        """Best file for ``segment``: ``_start_end`` over ``_start`` over bare YTID, then format."""
        best: tuple[int, int, str] | None = None
        for c in self._by_ytid.get(segment.ytid, ()):
            if c.start is not None and not _time_matches(c.start, segment.start):
                continue
            if c.end is not None and not _time_matches(c.end, segment.end):
                continue
            candidate = (c.rank, c.ext_rank, c.path)
            if best is None or candidate < best:
                best = candidate
        return None if best is None else best[2]

    def find_named(self, lookup: tuple[tuple[str, str], ...]) -> str | None:
        """Best file for a whole-file segment (every format but AudioSet): the first
        ``(name, ext)`` of ``lookup`` that has a file ``name.*`` -- anywhere under the root, or
        at that relative path when the index was built ``by_path`` -- preferring extension
        ``ext``, then lossless formats."""
        table = self._by_ytid if self._by_path is None else self._by_path
        for name, ext in lookup:
            best: tuple[bool, int, str] | None = None
            for c in table.get(name, ()):
                if c.start is not None:  # "{name}_{time}" readings are AudioSet's
                    continue
                candidate = (c.path.rpartition(".")[2].lower() != ext, c.ext_rank, c.path)
                if best is None or candidate < best:
                    best = candidate
            if best is not None:
                return best[2]
        return None

    def relative(self, path: str) -> str:
        """Path relative to the audio dir, as recorded in failed.csv and the sample JSON."""
        return Path(os.path.relpath(path, self.root)).as_posix()

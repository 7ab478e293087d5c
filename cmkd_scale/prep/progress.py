"""Periodic progress lines (clips/s, ETA) through stdlib logging, readable in SLURM logs."""

from __future__ import annotations

import logging
import time
from datetime import timedelta

log = logging.getLogger(__name__)


class Progress:
    """Counts segments handled and clips written; logs every ``every_s`` seconds and at the end."""

    def __init__(self, total_segments: int, every_s: float = 10.0, what: str = "prep") -> None:
        self.total = total_segments
        self.every_s = every_s
        self.what = what
        self.segments = self.clips = self.missing = self.failed = 0
        self._t0 = self._last = time.monotonic()

    def update(self, *, clips: int = 0, missing: int = 0, failed: int = 0) -> None:
        self.clips += clips
        self.missing += missing
        self.failed += failed
        self.segments += clips + missing + failed
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self.log()

    def rate(self) -> float:
        """Clips written per second of wall time so far."""
        return self.clips / max(time.monotonic() - self._t0, 1e-9)

    def log(self, final: bool = False) -> None:
        elapsed = time.monotonic() - self._t0
        seg_rate = self.segments / max(elapsed, 1e-9)
        left = (self.total - self.segments) / seg_rate if seg_rate > 0 else float("inf")
        eta = "done" if final else (str(timedelta(seconds=round(left))) if left < 1e9 else "?")
        pct = 100.0 * self.segments / max(self.total, 1)
        log.info(
            "%s: %d/%d segments (%.1f%%), %d clips written, %.1f clips/s, %d missing, %d failed, "
            "elapsed %s, ETA %s",
            self.what,
            self.segments,
            self.total,
            pct,
            self.clips,
            self.rate(),
            self.missing,
            self.failed,
            timedelta(seconds=round(elapsed)),
            eta,
        )

"""Stdlib logging, set up once per process by each command-line entry point."""

from __future__ import annotations

import logging
import os
import sys

_FORMAT = "%(asctime)s %(levelname)s %(name)s%(rank)s: %(message)s"


class _RankFilter(logging.Filter):
    """Adds ``[rank N]`` to records when running distributed, so interleaved logs stay legible."""

    def filter(self, record: logging.LogRecord) -> bool:
        world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")) or 1)
        rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", ""))
        record.rank = f" [rank {rank}]" if world > 1 and rank != "" else ""
        return True


def setup_logging(level: str | int | None = None) -> None:
    """Configure the root logger once; ``CMKD_LOG_LEVEL`` overrides the default INFO."""
    root = logging.getLogger()
    if getattr(root, "_cmkd_configured", False):
        return
    level = level or os.environ.get("CMKD_LOG_LEVEL", "INFO")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    handler.addFilter(_RankFilter())
    root.handlers[:] = [handler]
    root.setLevel(level)
    root._cmkd_configured = True  # type: ignore[attr-defined]

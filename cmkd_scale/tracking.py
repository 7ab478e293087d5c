"""Experiment tracking (MLflow). The only module that imports ``mlflow``.

INTERFACE SKELETON: the tracking work (issue 5) replaces the body; the trainer codes against
these method names only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class Tracker:
    """Rank-0 tracker. Every method is safe to call on every rank (others hold a no-op)."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_eval(
        self, stats: dict[str, Any], step: int, epoch: int, class_names: list[str]
    ) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def finish(self, status: str = "FINISHED", note: str = "") -> None: ...


def make_tracker(cfg: Any, *, rank: int, run_dir: Path) -> Tracker:
    """Decide once: rank 0 gets a real tracker, every other rank a no-op."""
    return Tracker()

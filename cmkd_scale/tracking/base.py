"""The tracker interface, and the no-op tracker of ranks > 0 or disabled tracking.

Kept apart from ``cmkd_scale.tracking`` so that holding a no-op tracker imports no MLflow
(ranks > 0 and ``tracking.enabled=false`` runs, e.g. the benchmarks, need no mlflow at all).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


class Tracker:
    """The no-op tracker other ranks hold (and rank 0 when tracking is disabled)."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        """Flattened resolved config (``cfg.flat()``)."""

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Run tags (strings)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Per-step scalars; buffered and sent in batches."""

    def log_eval(
        self,
        stats: Any,
        step: int,
        epoch: int,
        class_names: Sequence[str],
        prefix: str = "eval",
    ) -> None:
        """mAP/mAUC/d'/best mAP, a per-class AP CSV and the eval plots."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file or directory from the run, uploaded as is."""

    def log_text(self, text: str, artifact_file: str) -> None:
        """A text artifact (kept under RUN_DIR/tracking/artifacts as well)."""

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """A JSON (``.json``) or YAML artifact."""

    def log_model(self, path: str | Path, *, register: str = "") -> None:
        """An export as the run's MLflow model (a pyfunc that tags audio files, see
        cmkd_scale/serve/mlflow_model.py); registered as ``register`` when given."""

    def log_checkpoint(self, path: str | Path) -> None:
        """The exported student: uploaded when cfg.tracking.log_checkpoint, its path as a tag."""

    def finish(self, status: str = "FINISHED", note: str = "") -> None:
        """End the run: FINISHED, FAILED or KILLED (``note`` says why / where to resume)."""

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            self.finish("FINISHED")
        elif isinstance(exc, (KeyboardInterrupt, SystemExit)):
            self.finish("KILLED", note=f"{type(exc).__name__}: {exc}")
        else:
            self.finish("FAILED", note=f"{type(exc).__name__}: {exc}")

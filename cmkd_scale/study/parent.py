"""The study's MLflow parent run: every training's run is its child (tag mlflow.parentRunId,
set by the trainer from ``tracking.parent_run_id``); the parent holds the study table as
params and metrics, and study.json, study.png and the table text as artifacts.

The parent's id is kept in ``OUT/study_state.json``, so a rerun of the study continues the same
parent run. Tracking never stops the study: a store that cannot be reached costs a warning,
and the trainings then carry no parent.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def resolve_study_uri(configured: str, out: Path) -> str:
    """study tracking.uri, else $MLFLOW_TRACKING_URI, else the embedded store in OUT."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "")
    return uri or f"sqlite:///{(out / 'mlflow.db').resolve()}"


class ParentRun:
    """One MLflow run for the whole study (driven by the tracker's RemoteRun)."""

    def __init__(self, uri: str, experiment: str, name: str, state_file: Path) -> None:
        self.uri, self.experiment, self.name = uri, experiment, name
        self.state_file = state_file
        self.remote: Any = None
        self.run_id = ""

    def open(self, tags: dict[str, str]) -> str:
        """Create (or continue) the parent run; its id, or "" when MLflow cannot be reached."""
        from cmkd_scale.tracking.remote import RemoteRun, bound_http, local_artifact_location

        bound_http(5.0, 1)
        state = self._state()
        resume = state.get("parent_run_id") if state.get("uri") == self.uri else None
        try:
            remote = RemoteRun(self.uri)
            if not remote.reachable():
                raise ConnectionError(f"no answer from {self.uri}/health")
            run_id = remote.open(
                experiment=self.experiment,
                name=self.name,
                resume_id=resume,
                artifact_location=local_artifact_location(self.uri),
            )
            remote.send_tags(tags)
        except Exception as exc:
            log.warning(
                "MLflow at %s: no parent run for this study (%s); the trainings still log "
                "their own runs",
                self.uri,
                str(exc).splitlines()[0][:300],
            )
            return ""
        self.remote, self.run_id = remote, run_id
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(
            json.dumps({**state, "uri": self.uri, "parent_run_id": run_id}, indent=2) + "\n"
        )
        log.info("MLflow parent run %s: %s", run_id, remote.ui_url())
        return run_id

    def _state(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    def record(self, params: dict[str, Any], metrics: dict[str, float], files: list[Path]) -> None:
        """Params (new ones; a changed value becomes a resumed.* tag), metrics, artifacts."""
        if self.remote is None:
            return
        ts = int(time.time() * 1000)
        try:
            self.remote.send_params({k: str(v)[:6000] for k, v in params.items()})
            self.remote.send_metrics([(k, float(v), ts, 0) for k, v in metrics.items()])
            for path in files:
                if path.exists():
                    self.remote.send_artifact(str(path), None)
        except Exception as exc:
            log.warning("MLflow parent run %s: could not log the study (%s)", self.run_id, exc)

    def finish(self, status: str) -> None:
        if self.remote is None:
            return
        try:
            self.remote.send(("status", (status, int(time.time() * 1000))))
        except Exception as exc:
            log.warning("MLflow parent run %s: could not set %s (%s)", self.run_id, status, exc)

"""The MLflow side of tracking: where runs go and one run on a server. The only module that
imports ``mlflow`` (the tracker, the upload command and the sender go through ``RemoteRun``)."""

from __future__ import annotations

import logging
import math
import os
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from cmkd_scale.tracking.sender import Op, Point

log = logging.getLogger(__name__)

_BATCH_PARAMS = 100  # MLflow's per-log_batch limits
_BATCH_TAGS = 100
_BATCH_POINTS = 1000


def resolve_uri(configured: str, run_dir: Path) -> str:
    """cfg.tracking.uri, else $MLFLOW_TRACKING_URI, else sqlite under the run directory."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "")
    return uri or f"sqlite:///{(Path(run_dir) / 'mlflow.db').resolve()}"


def local_artifact_location(uri: str) -> str | None:
    """For a SQLite store, ``mlartifacts`` next to the database file (the server's default
    otherwise)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()


def bound_http(timeout_s: float, max_retries: int) -> None:
    """Bound every MLflow HTTP call (the defaults block ~4 min per call on a dead server)."""
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, math.ceil(timeout_s)))
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(max(0, max_retries))
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"


class RemoteRun:
    """One MLflow run on one tracking server, driven by MlflowClient with an explicit run id."""

    def __init__(self, uri: str, *, health_timeout_s: float = 5.0) -> None:
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._health_timeout_s = health_timeout_s

    def reachable(self) -> bool:
        """An HTTP server answers /health in time; a database URI is always 'reachable'."""
        if not self.uri.startswith(("http://", "https://")):
            return True
        try:
            with urllib.request.urlopen(
                f"{self.uri.rstrip('/')}/health", timeout=self._health_timeout_s
            ) as resp:
                return resp.status == 200
        except OSError:
            return False

    def is_rejection(self, exc: Exception) -> bool:
        """The server answered and refused the record (4xx): retrying cannot help."""
        return isinstance(exc, MlflowException) and exc.get_http_status_code() < 500

    def open(
        self,
        *,
        experiment: str,
        name: str,
        resume_id: str | None,
        artifact_location: str | None,
        reopen: bool = True,
    ) -> str:
        """Continue ``resume_id`` if the server has it (RUNNING again when ``reopen``), else
        create a run; return its id."""
        if resume_id and not resume_id.startswith("local-"):
            try:
                run = self.client.get_run(resume_id)
            except MlflowException as exc:
                if exc.get_http_status_code() >= 500:
                    raise
                log.warning("run %s not found at %s; starting a new run", resume_id, self.uri)
            else:
                if reopen and run.info.status != "RUNNING":
                    self.client.update_run(resume_id, status="RUNNING")
                self.run_id, self.experiment_id = resume_id, run.info.experiment_id
                return resume_id
        self.experiment_id = self._experiment_id(experiment, artifact_location)
        run = self.client.create_run(self.experiment_id, run_name=name or None)
        self.run_id = run.info.run_id
        return self.run_id

    def _experiment_id(self, name: str, artifact_location: str | None) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:  # another run created it meanwhile
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def ui_url(self) -> str:
        base = self.uri.rstrip("/") if self.uri.startswith("http") else "http://127.0.0.1:5000"
        return f"{base}/#/experiments/{self.experiment_id}/runs/{self.run_id}"

    # -- sending (called from the sender thread and the upload command)

    def send(self, op: Op) -> None:
        kind, payload = op
        if kind == "metrics":
            self.send_metrics(payload)
        elif kind == "params":
            self.send_params(payload)
        elif kind == "tags":
            self.send_tags(payload)
        elif kind == "artifact":
            self.send_artifact(*payload)
        elif kind == "status":
            self.client.set_terminated(self.run_id, status=payload[0], end_time=payload[1])
        else:
            raise ValueError(f"unknown tracking record kind {kind!r}")

    def send_metrics(self, points: Sequence[Point]) -> None:
        metrics = [Metric(k, v, ts, step) for k, v, ts, step in points]
        for i in range(0, len(metrics), _BATCH_POINTS):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + _BATCH_POINTS])

    def send_params(self, params: dict[str, str]) -> int:
        """Log the params the run lacks; a changed value (resume) becomes a ``resumed.*`` tag."""
        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        changed = {
            f"resumed.{k}": v for k, v in params.items() if k in existing and existing[k] != v
        }
        for i in range(0, len(new), _BATCH_PARAMS):
            self.client.log_batch(self.run_id, params=new[i : i + _BATCH_PARAMS])
        if changed:
            log.warning("params changed since the run began (logged as tags): %s", changed)
            self.send_tags(changed)
        return len(new)

    def send_tags(self, tags: dict[str, str]) -> None:
        items = [RunTag(k, v) for k, v in tags.items()]
        for i in range(0, len(items), _BATCH_TAGS):
            self.client.log_batch(self.run_id, tags=items[i : i + _BATCH_TAGS])

    def send_artifact(self, path: str, artifact_path: str | None) -> None:
        """A file, or a directory under its own name (``artifact_path/dirname/...``)."""
        if Path(path).is_dir():
            name = Path(path).name
            target = f"{artifact_path}/{name}" if artifact_path else name
            self.client.log_artifacts(self.run_id, path, target)
        else:
            self.client.log_artifact(self.run_id, path, artifact_path)

    # -- what the server already has (upload command)

    def metric_points(self, key: str) -> set[tuple[int, int, str]]:
        return {
            (m.step, m.timestamp, repr(m.value))
            for m in self.client.get_metric_history(self.run_id, key)
        }

    def artifact_sizes(self, artifact_dir: str | None) -> dict[str, int | None]:
        try:
            return {
                f.path: f.file_size for f in self.client.list_artifacts(self.run_id, artifact_dir)
            }
        except (MlflowException, OSError):
            return {}

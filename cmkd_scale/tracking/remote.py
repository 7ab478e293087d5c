"""The MLflow side of tracking: where runs go and one run on a server. The only module that
imports ``mlflow`` (the tracker, the upload command and the sender go through ``RemoteRun``)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from cmkd_scale.tracking.sender import Op, Point

log = logging.getLogger(__name__)

_BATCH_PARAMS = 100  # MLflow's per-log_batch limits
_BATCH_TAGS = 100
_BATCH_POINTS = 1000

# What MLflow 3's UI reads from an experiment's tags. ``mlflow.experimentKind`` says "this
# experiment trains models" (the UI's own kind selector writes the same tag and value);
# 3.17's UI decides the landing tab from its GenAI / Machine-learning switch, so the links
# we print also carry ``workflowType=machine_learning``. A ``mlflow.sharedViewState.<key>`` tag
# is a saved runs-table view (the UI's "Share" button writes one), opened by
# ``?viewStateShareKey=<key>``: ours selects the eval summary and KD setup columns.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
VIEW_KEY = "cmkd-summary"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
DATA_CONTEXT_TAG = "mlflow.data.context"  # training / validation / evaluation
_DIGEST_CHARS = 16  # MLflow keeps at most 36 characters of a dataset digest


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


class ModelNotLogged(RuntimeError):
    """A model that cannot be logged for a reason of its own (not the server's)."""


class RemoteRun:
    """One MLflow run on one tracking server, driven by MlflowClient with an explicit run id."""

    def __init__(
        self,
        uri: str,
        *,
        health_timeout_s: float = 5.0,
        view_columns: Sequence[str] = (),
    ) -> None:
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._health_timeout_s = health_timeout_s
        self._view_columns = list(view_columns)

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
        """The server answered and refused the record (4xx), or a model cannot be logged:
        retrying cannot help."""
        if isinstance(exc, ModelNotLogged):
            return True
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
        if found is None:
            with contextlib.suppress(MlflowException):  # another run may create it meanwhile
                self.client.create_experiment(
                    name,
                    artifact_location=artifact_location,
                    tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
                )
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise MlflowException(f"experiment {name!r} could not be created at {self.uri}")
        self._label_experiment(found.experiment_id, found.tags)
        return found.experiment_id

    def _label_experiment(self, experiment_id: str, tags: dict[str, str]) -> None:
        """A training experiment: its kind (unless a user chose another) and our table view."""
        if EXPERIMENT_KIND_TAG not in tags:
            self.client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        if self._view_columns:
            view = table_view(self._view_columns)
            if tags.get(VIEW_TAG) != view:
                self.client.set_experiment_tag(experiment_id, VIEW_TAG, view)

    def base_url(self) -> str:
        return self.uri.rstrip("/") if self.uri.startswith("http") else "http://127.0.0.1:5000"

    def ui_url(self) -> str:
        """The run's page."""
        return (
            f"{self.base_url()}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
            "?workflowType=machine_learning"
        )

    def experiment_url(self) -> str:
        """The experiment's runs table with the eval summary and KD setup columns."""
        return experiment_url(self.base_url(), self.experiment_id or "0", bool(self._view_columns))

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
        elif kind == "inputs":
            self.send_inputs(payload)
        elif kind == "model":
            self.send_model(payload)
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

    def send_inputs(self, datasets: Sequence[dict[str, Any]]) -> None:
        """Dataset inputs (``dataset_record`` dicts): the run page's Datasets, the Dataset
        column. Logging one again is a no-op on the server."""
        self.client.log_inputs(self.run_id, datasets=[_dataset_input(d) for d in datasets])

    def has_model(self, name: str) -> bool:
        """Whether the run already has a logged model called ``name`` (upload command)."""
        found = self.client.search_logged_models(
            experiment_ids=[
                self.experiment_id or self.client.get_run(self.run_id).info.experiment_id
            ],
            filter_string=f"source_run_id = '{self.run_id}' AND name = '{name}'",
        )
        return len(found) > 0

    def send_model(self, spec: dict[str, Any]) -> None:
        """An exported classifier as an MLflow pyfunc model of this run (``model_record``):
        ``spec["loader_module"]`` loads ``spec["path"]``; registered as ``spec["register"]``
        when that is set."""
        try:
            log_pyfunc_model(self.uri, self.run_id, spec)
        except (MlflowException, OSError):  # the server's answer or the connection: as any op
            raise
        except Exception as exc:  # our side (the export, the signature): retrying cannot help
            raise ModelNotLogged(f"{spec['path']}: {type(exc).__name__}: {exc}") from exc

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


# -- pure helpers (no server needed)


def table_view(columns: Sequence[str]) -> str:
    """The JSON of a saved runs-table view selecting ``columns`` (as the UI's Share writes)."""
    return json.dumps({"selectedColumns": list(columns), "columnOrder": list(columns)})


def experiment_url(base: str, experiment_id: str, with_view: bool = True) -> str:
    """An experiment's runs table in the training (machine-learning) view of MLflow 3's UI."""
    query = {"workflowType": "machine_learning"}
    if with_view:
        query["viewStateShareKey"] = VIEW_KEY
    return f"{base}/#/experiments/{experiment_id}/runs?{urllib.parse.urlencode(query)}"


def column(kind: str, key: str) -> str:
    """The UI's id of a runs-table column: kind is attributes, params, metrics or tags."""
    return f"{kind}.`{key}`"


def _dataset_input(record: dict[str, Any]) -> DatasetInput:
    source = record["source"]
    scheme = urllib.parse.urlparse(source).scheme if "://" in source else ""
    source_type = {"": "local", "file": "local", "s3": "s3", "http": "http", "https": "http"}
    kind = source_type.get(scheme, "external")
    source_json = {"url": source} if kind in ("http", "external") else {"uri": source}
    dataset = Dataset(
        name=record["name"],
        digest=str(record["digest"])[:_DIGEST_CHARS],
        source_type=kind,
        source=json.dumps(source_json),
        schema=json.dumps(record.get("schema") or {}),
        profile=json.dumps(record.get("profile") or {}),
    )
    return DatasetInput(dataset, tags=[InputTag(DATA_CONTEXT_TAG, record["context"])])


def _signature(spec: dict[str, Any]) -> Any:
    """Input: an ``audio`` column of file paths and/or a ``waveform`` column of 16 kHz mono
    float samples; output: the top labels; params: top_k, hop, window_pool."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    inputs = Schema(
        [
            ColSpec(DataType.string, "audio", required=False),
            ColSpec(Array(DataType.float), "waveform", required=False),
        ]
    )
    outputs = Schema(
        [
            ColSpec(DataType.string, "file"),
            ColSpec(Array(DataType.string), "labels"),
            ColSpec(Array(DataType.double), "probs"),
            ColSpec(DataType.double, "duration_s"),
        ]
    )
    params = ParamSchema(
        [
            ParamSpec("top_k", DataType.long, int(spec.get("top_k", 5))),
            ParamSpec("hop", DataType.long, 0),
            ParamSpec("window_pool", DataType.string, "max"),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def log_pyfunc_model(uri: str, run_id: str, spec: dict[str, Any]) -> str:
    """Log ``spec["path"]`` as the run's pyfunc model (loaded by ``spec["loader_module"]``'s
    ``_load_pyfunc``); register it when ``spec["register"]``. Returns the model's URI."""
    import mlflow.pyfunc
    from mlflow.models import Model
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    register = spec.get("register") or None
    name = spec.get("name", "model")
    client = MlflowClient(tracking_uri=uri)
    # created here, in the run's experiment: Model.log alone would put it in the process's
    # active experiment (the default one: the runs table's Models column would stay empty)
    logged = client.create_logged_model(
        experiment_id=client.get_run(run_id).info.experiment_id,
        name=name,
        source_run_id=run_id,
        tags={k: str(v) for k, v in spec.get("tags", {}).items()},
    )
    with _use_tracking_uri(uri):  # Model.log reads the process's tracking URI
        info = Model.log(
            None,  # artifact_path: deprecated for name, still positional
            name=name,
            model_id=logged.model_id,
            flavor=mlflow.pyfunc,
            run_id=run_id,
            registered_model_name=register,
            await_registration_for=0,
            loader_module=spec["loader_module"],
            data_path=spec["path"],  # copied into the model's data/ folder
            signature=_signature(spec),
            pip_requirements=list(spec.get("pip_requirements", [])),
            metadata=dict(spec.get("metadata", {})),
        )
    log.info("MLflow model %s%s", info.model_uri, f" registered as {register}" if register else "")
    return info.model_uri

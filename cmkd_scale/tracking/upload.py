"""Send a run directory's journal to an MLflow server: only what the server lacks.

    python -m cmkd_scale.tracking upload --run-dir RUN_DIR [--uri URI]

Use it after a run whose server was absent or died: params, tags, every metric point,
artifacts and the final status land in the run the tracker created (or a new one when the
server never saw it). Running it again sends nothing new. Only ``journal.jsonl`` is sent;
journals a fresh run moved aside (``journal-*.jsonl``) belong to older runs.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cmkd_scale.logs import setup_logging
from cmkd_scale.tracking.journal import JournalError, RunState, read_journal, tracking_dir
from cmkd_scale.tracking.remote import RemoteRun, bound_http, local_artifact_location

log = logging.getLogger(__name__)


class UploadError(RuntimeError):
    """The run directory or the server is not usable; the message says what to do."""


@dataclass
class UploadReport:
    run_id: str
    params: int = 0
    tags: int = 0
    metric_points: int = 0
    metric_points_present: int = 0
    artifacts: int = 0
    artifacts_present: int = 0
    artifacts_missing_locally: int = 0
    datasets: int = 0
    models: int = 0
    models_present: int = 0
    status: str = ""


def _artifact_files(path: Path, artifact_path: str | None) -> list[tuple[Path, str | None]]:
    """(local file, artifact dir) pairs for a logged file or directory, as the tracker sends."""
    if not path.is_dir():
        return [(path, artifact_path)]
    base = f"{artifact_path}/{path.name}" if artifact_path else path.name
    files = []
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.parent.relative_to(path).as_posix()
        files.append((file, base if rel == "." else f"{base}/{rel}"))
    return files


def upload(run_dir: Path, uri: str | None = None) -> UploadReport:
    """Diff the journal against the server and send the difference."""
    run_dir = Path(run_dir).resolve()
    state = RunState(run_dir)
    journal = tracking_dir(run_dir) / "journal.jsonl"
    if state.local_id is None or not journal.is_file():
        raise UploadError(
            f"{run_dir} has no tracking journal ({journal}); pass the run directory a training "
            "run wrote (run.dir)"
        )
    uri = uri or state.data["uri"]
    records = list(read_journal(journal))
    # patient but bounded: this runs after training, nothing waits on it
    bound_http(
        float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", 30)),
        int(os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", 3)),
    )
    remote = RemoteRun(uri, health_timeout_s=10.0)
    if not remote.reachable():
        raise UploadError(f"MLflow at {uri} does not answer; start it (or pass --uri) and rerun")
    artifact_location = local_artifact_location(uri)
    run_id = remote.open(
        experiment=state.data["experiment"],
        name=state.data["name"],
        resume_id=state.remote_id(uri),
        artifact_location=artifact_location,
        reopen=False,
    )
    state.set_remote(uri, run_id)
    report = UploadReport(run_id=run_id)
    _send_params_and_tags(remote, records, report)
    _send_metrics(remote, records, report)
    _send_artifacts(remote, records, report)
    _send_inputs_and_models(remote, records, report)
    _send_status(remote, records, report)
    return report


def _send_params_and_tags(
    remote: RemoteRun, records: list[dict[str, Any]], report: UploadReport
) -> None:
    params: dict[str, str] = {}
    tags: dict[str, str] = {}
    for record in records:
        if record["t"] == "params":
            for key, value in record["params"].items():
                params.setdefault(key, value)  # the first value is the run's param
        elif record["t"] == "tags":
            tags.update(record["tags"])
    report.params = remote.send_params(params) if params else 0
    have = remote.client.get_run(remote.run_id).data.tags
    missing = {k: v for k, v in tags.items() if have.get(k) != v}
    if missing:
        remote.send_tags(missing)
    report.tags = len(missing)


def _send_metrics(remote: RemoteRun, records: list[dict[str, Any]], report: UploadReport) -> None:
    by_key: dict[str, list[tuple[str, float, int, int]]] = defaultdict(list)
    for record in records:
        if record["t"] == "metrics":
            for key, value in record["values"].items():
                by_key[key].append((key, float(value), record["ts"], record["step"]))
    for key, points in sorted(by_key.items()):
        have = remote.metric_points(key)
        missing = [p for p in points if (p[3], p[2], repr(p[1])) not in have]
        report.metric_points_present += len(points) - len(missing)
        if missing:
            remote.send_metrics(missing)
            report.metric_points += len(missing)
            log.info("%s: sent %d of %d points", key, len(missing), len(points))


def _send_artifacts(remote: RemoteRun, records: list[dict[str, Any]], report: UploadReport) -> None:
    logged: dict[tuple[str, str | None], None] = {}
    for record in records:
        if record["t"] == "artifact":
            logged[(record["path"], record["artifact_path"])] = None
    listings: dict[str | None, dict[str, int | None]] = {}
    for path, artifact_path in logged:
        if not Path(path).exists():
            log.warning("artifact %s is gone from disk; not uploaded", path)
            report.artifacts_missing_locally += 1
            continue
        for file, directory in _artifact_files(Path(path), artifact_path):
            if directory not in listings:
                listings[directory] = remote.artifact_sizes(directory)
            remote_path = f"{directory}/{file.name}" if directory else file.name
            if listings[directory].get(remote_path) == file.stat().st_size:
                report.artifacts_present += 1
                continue
            remote.client.log_artifact(remote.run_id, str(file), directory)
            report.artifacts += 1


def _send_inputs_and_models(
    remote: RemoteRun, records: list[dict[str, Any]], report: UploadReport
) -> None:
    """Dataset inputs (the server ignores one it has) and logged models the run lacks."""
    for record in records:
        if record["t"] == "inputs":
            remote.send_inputs(record["datasets"])
            report.datasets += len(record["datasets"])
        elif record["t"] == "model":
            spec = record["spec"]
            if remote.has_model(spec["name"]):
                report.models_present += 1
            elif not Path(spec["path"]).is_file():
                log.warning("model %s is gone from disk; not uploaded", spec["path"])
            else:
                remote.send_model(spec)
                report.models += 1


def _send_status(remote: RemoteRun, records: list[dict[str, Any]], report: UploadReport) -> None:
    last = next((r for r in reversed(records) if r["t"] in ("start", "status")), None)
    info = remote.client.get_run(remote.run_id).info
    if last is None or last["t"] == "start":
        log.warning(
            "the journal has no end status after the last start (the run is still going or was "
            "killed hard); the server's status stays %s",
            info.status,
        )
        report.status = info.status
        return
    if info.status != last["status"] or info.end_time != last["end_ms"]:
        remote.client.set_terminated(remote.run_id, status=last["status"], end_time=last["end_ms"])
    report.status = last["status"]


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m cmkd_scale.tracking upload",
        description="Send what an MLflow server lacks of a run directory's tracking journal.",
    )
    p.add_argument("--run-dir", required=True, type=Path, help="the training run's run.dir")
    p.add_argument("--uri", default=None, help="tracking URI (default: the one the run used)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = _parse_args(argv)
    try:
        report = upload(args.run_dir, args.uri)
    except (UploadError, JournalError) as exc:
        log.error("%s", exc)
        return 2
    log.info("upload done: %s", asdict(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

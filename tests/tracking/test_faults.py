"""Tracking never stops training: a server absent from the start, hung, or killed mid-run.

Each test runs the tracker in this process against its own real ``mlflow server`` (faults are
real: the port has no listener, the server is frozen with SIGSTOP, killed with SIGKILL), then
restarts a server on the same database and port and sends the rest with the upload command.
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from cmkd_scale.config import load_config
from cmkd_scale.tracking import make_tracker
from cmkd_scale.tracking.journal import read_journal
from cmkd_scale.tracking.upload import upload
from tests.fixtures.mlflow_server import free_port, start_server

pytestmark = [pytest.mark.mlflow_server, pytest.mark.slow]

CLASSES = ["speech", "music", "dog", "siren"]
# The training thread only appends to a local file and enqueues, so a call normally takes
# well under 10 ms; 3 s is a generous bound for 2 loaded CPU cores that still fails at once if
# any HTTP call (2 s timeout here, ~4 min with MLflow's defaults) ever ran on that thread.
MAX_CALL_S = 3.0


def _cfg(uri: str):
    return load_config(
        None,
        [
            "model.arch=ast",
            f"tracking.uri={uri}",
            "tracking.request_timeout_s=2",
            "tracking.max_retries=0",
            "tracking.flush_every_s=0.3",
            "tracking.system_metrics_interval_s=0.5",
            "tracking.finish_timeout_s=30",
        ],
    )


def _eval_stats(step: int) -> dict:
    ap = np.linspace(0.2, 0.8, len(CLASSES)) * min(1.0, step / 100)
    return {"mAP": ap.mean(), "mAUC": 0.8, "dprime": 1.2, "AP": ap, "AUC": np.full(4, 0.8)}


def _journal_points(run_dir: Path) -> dict[str, list[int]]:
    points: dict[str, list[int]] = {}
    for record in read_journal(run_dir / "tracking" / "journal.jsonl"):
        if record["t"] == "metrics":
            for key in record["values"]:
                points.setdefault(key, []).append(record["step"])
    return points


def _only_run(client: MlflowClient, run_dir: Path):
    exp = client.get_experiment_by_name("cmkd_scale")
    runs = client.search_runs([exp.experiment_id], f"tags.`cmkd.run_dir` = '{run_dir.resolve()}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def _timed(durations: list[float], fn, *args) -> None:
    start = time.perf_counter()
    fn(*args)
    durations.append(time.perf_counter() - start)


def _assert_upload_completes_the_run(run_dir: Path, uri: str) -> None:
    """Upload sends exactly what the server lacks; a second upload sends nothing."""
    journal = _journal_points(run_dir)
    total = sum(len(v) for v in journal.values())
    report = upload(run_dir)
    assert report.metric_points + report.metric_points_present == total
    assert report.status == "FINISHED"
    client = MlflowClient(uri)
    run = _only_run(client, run_dir)
    assert run.info.status == "FINISHED"
    for key, steps in journal.items():
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == sorted(steps), key
    assert run.data.params["tracking.request_timeout_s"] == "2.0"
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "eval", "plots"} <= names
    again = upload(run_dir)
    assert (again.metric_points, again.params, again.tags, again.artifacts) == (0, 0, 0, 0)
    assert again.metric_points_present == total


def test_server_absent_from_the_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()  # nothing listens here until the upload
    uri = f"http://127.0.0.1:{port}"
    run_dir = tmp_path / "run"
    cfg = _cfg(uri)
    durations: list[float] = []
    with caplog.at_level(logging.WARNING, logger="cmkd_scale"):
        start = time.perf_counter()
        tracker = make_tracker(cfg, rank=0, run_dir=run_dir)
        durations.append(time.perf_counter() - start)
        warned_at_start = len(caplog.records)
        assert tracker.run_id.startswith("local-")
        _timed(durations, tracker.log_params, cfg.flat())
        for step in range(1, 61):
            _timed(durations, tracker.log_metrics, {"loss": 1 / step, "lr": 1e-4}, step)
            if step % 30 == 0:
                _timed(durations, tracker.log_eval, _eval_stats(step), step, step // 30, CLASSES)
            time.sleep(0.02)
        warned_during_steps = len(caplog.records) - warned_at_start
        _timed(durations, tracker.finish)
    unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(unreachable) == 1 and warned_at_start == 1, [r.getMessage() for r in caplog.records]
    assert warned_during_steps == 0
    assert "upload --run-dir" in caplog.records[-1].getMessage()
    assert max(durations) < MAX_CALL_S + 2.0  # make_tracker: one refused health check
    assert max(durations[1:-1]) < MAX_CALL_S
    assert _journal_points(run_dir)["loss"] == list(range(1, 61))

    server = start_server(tmp_path / "server", port=port)
    try:
        _assert_upload_completes_the_run(run_dir, uri)
    finally:
        server.stop()


def test_server_hung_then_killed_mid_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = start_server(tmp_path / "server")
    run_dir = tmp_path / "run"
    cfg = _cfg(server.uri)
    client = MlflowClient(server.uri)
    durations: list[float] = []
    step = 0

    def train(steps: int, until=lambda: True, within_s: float = 90.0) -> None:
        """At least ``steps`` steps, then on until ``until()`` holds (or time runs out)."""
        nonlocal step
        deadline = time.monotonic() + within_s
        done = 0
        while done < steps or (not until() and time.monotonic() < deadline):
            done += 1
            step += 1
            _timed(durations, tracker.log_metrics, {"loss": 1 / step, "lr": 1e-4}, step)
            if step % 40 == 0:
                _timed(durations, tracker.log_eval, _eval_stats(step), step, step // 40, CLASSES)
            time.sleep(0.03)

    try:
        tracker = make_tracker(cfg, rank=0, run_dir=run_dir)
        run_id = tracker.run_id
        assert not run_id.startswith("local-")
        tracker.log_params(cfg.flat())
        train(30)
        server.signal(signal.SIGSTOP)  # hung: connections open, no answer
        train(40, until=lambda: tracker.sender.offline)
        assert tracker.sender.offline, "a frozen server was never noticed"
        hung = step
        server.signal(signal.SIGCONT)  # back: the buffered points must arrive by themselves
        train(1, until=lambda: not tracker.sender.offline)
        assert not tracker.sender.offline, "the sender never reconnected"
        delivered = {m.step for m in client.get_metric_history(run_id, "loss")}
        assert set(range(31, hung + 1)) <= delivered  # logged while hung, delivered later
        server.kill()  # dead: connection refused from now on
        train(40)
        start = time.perf_counter()
        tracker.finish()
        finish_s = time.perf_counter() - start
    finally:
        server.stop()
    assert max(durations) < MAX_CALL_S, max(durations)
    assert finish_s < 15, finish_s  # one failed attempt, no retry storm
    assert _journal_points(run_dir)["loss"] == list(range(1, step + 1))
    assert tracker.sender.unsent > 0  # the dead server really missed records
    unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(unreachable) == 2  # one per outage, not one per step

    server = start_server(tmp_path / "server", port=server.port)  # same db, same port
    try:
        missed = step - len(client.get_metric_history(run_id, "loss"))
        assert missed > 0
        _assert_upload_completes_the_run(run_dir, server.uri)
        assert _only_run(client, run_dir).info.run_id == run_id  # the same run, completed
    finally:
        server.stop()

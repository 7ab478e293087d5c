"""2-rank runs against a real ``mlflow server``, read back through MlflowClient.

The driver in fixtures_mlflow.py trains a tiny model over gloo on 2 ranks and calls the
tracker exactly as the trainer does (rank 0 real, rank 1 no-op).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from fixtures_mlflow import CLASS_NAMES, mlflow_server, run_driver  # noqa: F401
from mlflow import MlflowClient

from cmkd_scale.tracking_journal import read_journal

pytestmark = [pytest.mark.mlflow_server, pytest.mark.slow]


def _only_run(client: MlflowClient, run_dir: Path):
    exp = client.get_experiment_by_name("cmkd_scale")
    runs = client.search_runs([exp.experiment_id], f"tags.`cmkd.run_dir` = '{run_dir.resolve()}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def _ok(proc) -> None:
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_two_rank_run_is_one_finished_run_with_everything(mlflow_server, tmp_path: Path) -> None:  # noqa: F811
    run_dir = tmp_path / "run"
    _ok(run_driver(run_dir, mlflow_server.uri, "--steps", "12", "--eval-every", "6"))
    client = MlflowClient(mlflow_server.uri)
    run = _only_run(client, run_dir)
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    # params: the flattened resolved config
    assert run.data.params["optim.lr"] == "1e-05"
    assert run.data.params["model.name"] == "tiny_linear"
    assert run.data.params["tracking.uri"] == mlflow_server.uri
    # metric histories: one point per step, evals with best-so-far
    loss = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in loss) == list(range(1, 13))
    maps = sorted(client.get_metric_history(run_id, "eval/mAP"), key=lambda m: m.step)
    best = sorted(client.get_metric_history(run_id, "eval/best_mAP"), key=lambda m: m.step)
    assert [m.step for m in maps] == [6, 12]
    assert best[-1].value == max(m.value for m in maps)
    assert any(k.startswith("system/") for k in run.data.metrics)
    # tags
    tags = run.data.tags
    assert tags["world_size"] == "2" and tags["launcher"] == "torchrun"
    assert "fixtures_mlflow.py" in tags["command"]
    assert tags["student"] == "ast:tiny_linear" and tags["teacher"] == "none"
    assert tags["gpu"] == "none" and tags["git_commit"] != "unknown"
    # artifacts
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "deepspeed.json", "eval", "plots", "checkpoint"} <= names
    plots = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert {"plots/training_curves.png", "plots/map_per_epoch.png"} <= plots
    table = client.download_artifacts(run_id, "eval/eval_class_ap_epoch002_step12.csv", tmp_path)
    rows = list(csv.DictReader(io.StringIO(Path(table).read_text())))
    assert sorted(r["display_name"] for r in rows) == sorted(CLASS_NAMES)
    assert [a.path for a in client.list_artifacts(run_id, "checkpoint")] == [
        "checkpoint/student.pt"
    ]
    # only rank 0 tracked: one tracker start in the run's journal
    journal = list(read_journal(run_dir / "tracking" / "journal.jsonl"))
    assert [r["t"] for r in journal].count("start") == 1
    timing = json.loads((run_dir / "driver_timing.json").read_text())
    assert timing["max_call_s"] < 3.0, timing


def test_preempted_run_ends_killed_and_resume_continues_it(mlflow_server, tmp_path: Path) -> None:  # noqa: F811
    run_dir = tmp_path / "run"
    args = ("--steps", "10", "--eval-every", "5")
    # one rank is enough here (resume semantics do not depend on the world size; saves CPU)
    _ok(run_driver(run_dir, mlflow_server.uri, *args, "--sigterm-at", "4", nproc=1))
    client = MlflowClient(mlflow_server.uri)
    run = _only_run(client, run_dir)
    assert run.info.status == "KILLED"
    assert run.data.tags["resume_point"].endswith("resume.json at step 4")

    _ok(run_driver(run_dir, mlflow_server.uri, *args, nproc=1))  # resumes from resume.json
    run = _only_run(client, run_dir)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == list(range(1, 11))

"""2-rank runs against a real ``mlflow server``, read back through MlflowClient.

The driver in mlflow_driver.py trains a tiny model over gloo on 2 ranks and calls the
tracker exactly as the trainer does (rank 0 real, rank 1 no-op).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from cmkd_scale.tracking.journal import read_journal
from tests.fixtures.mlflow_server import ROOT, free_port, run_driver
from tests.tracking.mlflow_driver import CLASS_NAMES

pytestmark = [pytest.mark.mlflow_server, pytest.mark.slow]


def _only_run(client: MlflowClient, run_dir: Path):
    exp = client.get_experiment_by_name("cmkd_scale")
    runs = client.search_runs([exp.experiment_id], f"tags.`cmkd.run_dir` = '{run_dir.resolve()}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def _ok(proc) -> None:
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_two_rank_run_is_one_finished_run_with_everything(mlflow_server, tmp_path: Path) -> None:
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
    assert "mlflow_driver.py" in tags["command"]
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


def test_preempted_run_ends_killed_and_resume_continues_it(mlflow_server, tmp_path: Path) -> None:
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


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny synthetic AudioSet shards through the real prep (16 train, 7 eval clips)."""
    from tests.fixtures.data import make_shards

    root = tmp_path_factory.mktemp("tracking_shards")
    return {
        "train": make_shards(root / "train", num_clips=16, seed=0),
        "eval": make_shards(root / "eval", num_clips=7, seed=1),
    }


def test_real_trainer_two_ranks_logs_to_the_server(
    mlflow_server,
    shards: dict[str, Path],
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "cmkd_scale.train", "--config", str(ROOT / "configs" / "debug_cpu.yaml"),
        f"run.dir={run_dir}", f"data.train={shards['train']}", f"data.eval={shards['eval']}",
        "teacher=none", "run.epochs=2", "run.log_every_steps=1", "tracking.enabled=true",
        f"tracking.uri={mlflow_server.uri}", "tracking.flush_every_s=1",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    client = MlflowClient(mlflow_server.uri)
    run = _only_run(client, run_dir)
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.001"
    assert run.data.params["deepspeed.zero_stage"] == "2"
    # 16 clips / (micro batch 4 x 2 ranks) = 2 steps per epoch, 2 epochs
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [1, 2, 3, 4]
    for key in ("label_loss", "kd_loss", "lr", "grad_norm", "clips_per_s", "data_wait_frac"):
        assert len(client.get_metric_history(run_id, key)) == 4, key
    assert [m.step for m in client.get_metric_history(run_id, "eval/mAP")] == [2, 4]
    tags = run.data.tags
    assert tags["world_size"] == "2" and tags["launcher"] == "torchrun"
    assert tags["student"] == "ast:vit_tiny_patch16_224"
    manifest = shards["train"] / "manifest.json"
    assert tags["data.train.manifest"] == str(manifest)
    assert tags["data.train.sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert (run_dir / "tracker_run_id").read_text().strip() == run_id
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "deepspeed.json", "eval", "plots", "checkpoint", "data"} <= names
    exported = [a.path for a in client.list_artifacts(run_id, "checkpoint")]
    # no data.val: nothing is chosen; debug_cpu's wa range 1..2 makes the average the report
    assert exported == ["checkpoint/wa.pt"]
    assert [m.step for m in client.get_metric_history(run_id, "report/mAP")] == [4]
    assert tags["report.model"] == "wa" and tags["report.checkpoint"] == "models/wa.pt"
    table = client.download_artifacts(run_id, "eval/eval_class_ap_epoch002_step4.csv", tmp_path)
    rows = list(csv.DictReader(io.StringIO(Path(table).read_text())))
    assert len(rows) == 527 and "Speech" in {r["display_name"] for r in rows}

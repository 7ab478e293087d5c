"""The study command end to end on tiny data: real prep shards, the real trainer (tiny models, a
few steps, one seed, three rows), the embedded MLflow store read back with the MLflow client;
then a rerun that skips every finished training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.fixtures.train import ROOT, train_env  # the `data` fixture comes via conftest.py

pytestmark = pytest.mark.slow

ROWS = ["cnn", "ast", "cnn2ast"]


def _study_yaml(tmp: Path, data: dict[str, Path]) -> Path:
    path = tmp / "study_tiny.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "tiny",
                "seeds": 1,
                "rows": ROWS,
                "recipe": "configs/debug_cpu.yaml",  # tiny AST, 128 frames, 4 clips a step
                "data": {"train": str(data["train"]), "eval": str(data["eval"])},
                "train": {
                    "run.epochs": 1,
                    "run.max_steps": 3,
                    "run.log_every_steps": 1,
                    "run.checkpoint_every_steps": 0,
                    "eval.wa_start_epoch": 0,
                    "eval.wa_end_epoch": 0,
                    "tracking.system_metrics": False,
                },
                "cnn": {"model.arch": "timm", "model.name": "mobilenetv3_small_050"},
                "distill": {"lambda_": 0.5, "loss": "bce"},
            }
        )
    )
    return path


def _run_study(config: Path, out: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "cmkd_scale.study", "--config", str(config), "--out", str(out)]
    env = train_env()
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="module")
def study(data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("study")
    config = _study_yaml(tmp, data)
    out = tmp / "out"
    first = _run_study(config, out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
    return {"config": config, "out": out, "first": first}


def test_study_json_has_one_entry_per_training_with_metrics(study: dict) -> None:
    out = study["out"]
    result = json.loads((out / "study.json").read_text())
    entries = {(e["name"], e["seed"]): e for e in result["entries"]}
    assert sorted(entries) == [("ast", 0), ("cnn", 0), ("cnn2ast", 0)]
    for e in entries.values():
        for key in ("mAP", "acc", "mAUC"):
            assert 0.0 <= e[key] <= 1.0, (key, e)
        assert Path(e["run_dir"]).is_dir() and Path(e["checkpoint"]).is_file()
        assert e["wall_s"] > 0
    # the KD row was taught by the reported model of the seed-0 CNN baseline
    assert entries[("cnn2ast", 0)]["teacher"] == entries[("cnn", 0)]["checkpoint"]
    cfg = yaml.safe_load((Path(entries[("cnn2ast", 0)]["run_dir"]) / "config.yaml").read_text())
    assert cfg["teacher"]["checkpoint"] == entries[("cnn", 0)]["checkpoint"]
    assert cfg["model"]["arch"] == "ast" and cfg["teacher"]["arch"] == "timm"
    assert (out / "study.png").stat().st_size > 1000
    stdout = study["first"].stdout
    assert "AST <- CNN teacher (CMKD)" in stdout and "gain in mAP over no-KD" in stdout
    v = result["verdicts"][0]
    assert v["row"] == "cnn2ast" and v["gain"] == pytest.approx(
        entries[("cnn2ast", 0)]["mAP"] - entries[("ast", 0)]["mAP"]
    )
    if v["below"]:  # a KD row below its baseline is never printed without its reason
        assert "BELOW the AST baseline" in stdout and "Most likely:" in stdout


def test_parent_mlflow_run_groups_the_trainings(study: dict) -> None:
    from mlflow import MlflowClient

    out = study["out"]
    result = json.loads((out / "study.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    parent_id = result["mlflow"]["parent_run_id"]
    assert parent_id
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "study-tiny"
    runs = client.search_runs([parent.info.experiment_id])
    children = [r for r in runs if r.info.run_id != parent_id]
    assert sorted(r.info.run_name for r in children) == [f"tiny-{n}-seed0" for n in sorted(ROWS)]
    for child in children:
        assert child.data.tags.get("mlflow.parentRunId") == parent_id
        assert child.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"study.json", "study.png", "study.txt"} <= artifacts
    assert parent.data.metrics["cnn2ast/mAP_mean"] == pytest.approx(
        next(e["mAP"] for e in result["entries"] if e["name"] == "cnn2ast")
    )
    assert "cnn2ast/gain_mAP" in parent.data.metrics
    assert parent.data.params["study.rows"] == ",".join(ROWS)


def test_rerun_skips_finished_trainings(study: dict) -> None:
    from mlflow import MlflowClient

    out = study["out"]
    before = json.loads((out / "study.json").read_text())
    second = _run_study(study["config"], out)
    assert second.returncode == 0, second.stderr[-5000:]
    for name in ROWS:
        assert f"{name}-seed0: finished before" in second.stdout
    assert "training (log" not in second.stdout
    after = json.loads((out / "study.json").read_text())
    assert [(e["name"], e["mAP"]) for e in after["entries"]] == [
        (e["name"], e["mAP"]) for e in before["entries"]
    ]
    assert after["mlflow"]["parent_run_id"] == before["mlflow"]["parent_run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_run(after["mlflow"]["parent_run_id"]).info.experiment_id
    assert len(client.search_runs([exp])) == 1 + len(ROWS)  # no new runs


def test_bad_key_in_a_row_override_fails_before_any_training(study: dict, tmp_path: Path):
    config = yaml.safe_load(study["config"].read_text())
    config["ast"] = {"model.depht": 2}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = _run_study(path, tmp_path / "out")
    assert proc.returncode == 2
    assert "unknown config key 'model.depht'" in proc.stderr
    assert "training ast-seed0" in proc.stderr
    assert not (tmp_path / "out" / "runs").exists()


def test_rerun_with_other_settings_keeps_the_finished_runs_and_says_which_keys(study: dict):
    cmd = [
        sys.executable, "-m", "cmkd_scale.study", "--config", str(study["config"]),
        "--out", str(study["out"]), "train.run.max_steps=4",
    ]  # fmt: skip
    env = train_env()
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "note: cnn-seed0 was trained with other values of run.max_steps" in proc.stdout
    assert "training (log" not in proc.stdout


def test_a_study_with_a_teacher_cache_runs_the_teacher_once(
    data: dict[str, Path], tmp_path: Path
) -> None:
    """teacher_cache.views: after the CNN baseline, one cache pass; both seeds of the KD row
    train from it (the teacher is never built) and every row trains with data.views."""
    config = _study_yaml(tmp_path, data)
    tree = yaml.safe_load(config.read_text())
    tree.update(rows=["cnn", "cnn2ast"], seeds=2, teacher_cache={"views": 2, "top_k": 2})
    tree["tracking"] = {"enabled": False}
    tree["train"]["run.max_steps"] = 2
    config.write_text(yaml.safe_dump(tree))
    out = tmp_path / "out"
    proc = _run_study(config, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (cache,) = (out / "teacher_cache").iterdir()
    assert cache.name.startswith("cnn-") and (cache / "manifest.json").is_file()
    # computing ..., done in ... (seed 0), reused (seed 1)
    assert proc.stdout.count(f"teacher cache {cache}") == 3
    assert proc.stdout.count("finished, reused") == 1
    manifest = json.loads((cache / "manifest.json").read_text())
    assert (manifest["top_k"], manifest["key"]["views"]) == (2, 2)
    for seed in (0, 1):
        run = out / "runs" / "cnn2ast" / f"seed-{seed}"
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["teacher"]["cache"] == str(cache) and cfg["data"]["views"] == 2
        assert "the teacher is not built" in (out / "logs" / f"cnn2ast-seed{seed}.log").read_text()
    base = yaml.safe_load((out / "runs" / "cnn" / "seed-0" / "config.yaml").read_text())
    assert base["data"]["views"] == 2 and base["teacher"]["cache"] == ""
    # a rerun reuses the finished cache and trains nothing
    again = _run_study(config, out)
    assert again.returncode == 0 and "teacher cache" not in again.stdout
    assert "cnn2ast-seed1: finished before" in again.stdout

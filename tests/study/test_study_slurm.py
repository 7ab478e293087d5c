"""The study command with ``--launch slurm`` on the real one-machine SLURM cluster: each phase
submitted through launch/train.sbatch, waited for on the queue, the KD row taught by the
baseline that the first phase's job trained."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.fixtures.slurm import ROOT, SlurmCluster
from tests.fixtures.train import train_env

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_study_on_slurm_runs_both_phases_as_jobs(
    slurm_cluster: SlurmCluster, data: dict[str, Path], tmp_path: Path
) -> None:
    config = tmp_path / "study_slurm.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "tinyslurm",
                "rows": ["cnn", "cnn2cnn"],
                "recipe": "configs/debug_cpu.yaml",
                "data": {"train": str(data["train"]), "eval": str(data["eval"])},
                "train": {
                    "run.epochs": 1,
                    "run.max_steps": 2,
                    "run.checkpoint_every_steps": 0,
                    "eval.wa_start_epoch": 0,
                    "eval.wa_end_epoch": 0,
                    "tracking.system_metrics": False,
                },
                "cnn": {"model.arch": "timm", "model.name": "mobilenetv3_small_050"},
                "launch": {
                    "mode": "slurm",
                    "sbatch_args": ["--nodes=1", "--ntasks-per-node=1"],
                    "poll_s": 2,
                },
            }
        )
    )
    out = tmp_path / "out"
    env = {**train_env(), **slurm_cluster.env}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(
        [sys.executable, "-m", "cmkd_scale.study", "--config", str(config), "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    assert proc.stdout.count("SLURM job") >= 4  # 2 submitted + 2 done lines
    result = json.loads((out / "study.json").read_text())
    entries = {e["name"]: e for e in result["entries"]}
    assert sorted(entries) == ["cnn", "cnn2cnn"]
    assert entries["cnn2cnn"]["teacher"] == entries["cnn"]["checkpoint"]
    for name in entries:
        note = json.loads((out / "runs" / name / "seed-0" / "study_run.json").read_text())
        log = Path(note["log"])
        assert log.is_file() and f"-{note['slurm_job']}.log" in log.name
        assert "training finished" in log.read_text()  # train.sbatch's own last line
    assert (out / "study.png").is_file()

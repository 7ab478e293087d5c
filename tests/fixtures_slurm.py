"""A real single-machine SLURM cluster (launch/cluster_up.sh) for the launch tests.

Import the fixture into a test module with ``from fixtures_slurm import slurm_cluster``. The
cluster is started once per test session (in its own state dir, on free ports, so it never
meets a cluster a user started with the default settings) and stopped by cluster_down.sh.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"


@dataclass
class SlurmCluster:
    """Handle on the running test cluster: its state dir and the environment to reach it."""

    dir: Path
    env: dict[str, str]

    def run(
        self, *cmd: str | Path, cwd: Path | None = None, timeout: float = 60, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a SLURM client command (or a launch script) against this cluster."""
        return subprocess.run(
            [str(c) for c in cmd],
            env=self.env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def sbatch(
        self,
        script: Path,
        *args: str | Path,
        options: Sequence[str] = (),
        cwd: Path,
        wait: bool = False,
        timeout: float = 600,
    ) -> tuple[int, int]:
        """Submit ``script args``; returns (job id, exit code: sbatch's, or the job's with wait)."""
        cmd = ["sbatch", "--parsable", *options, *(["--wait"] if wait else []), script, *args]
        proc = self.run(*cmd, cwd=cwd, timeout=timeout, check=False)
        first = proc.stdout.split("\n", 1)[0].strip()
        assert first.split(";")[0].isdigit(), f"sbatch failed: {proc.stdout}\n{proc.stderr}"
        return int(first.split(";")[0]), proc.returncode

    def log_tail(self, lines: int = 40) -> str:
        """The end of the daemons' logs, for assertion messages."""
        parts = []
        for log in sorted((self.dir / "log").glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(parts)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port_run(count: int) -> int:
    """The first of ``count`` consecutive free TCP ports."""
    rng = random.Random(os.getpid())
    for _ in range(200):
        base = rng.randrange(30000, 60000 - count)
        if all(_port_free(base + i) for i in range(count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports found between 30000 and 60000")


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (launch/cluster_up.sh starts the daemons)"
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        return "SLURM is not installed and apt-get is not available to install it"
    return None


STATE_PREFIX = "cmkd-slurm-test-"


def _reap_stale_clusters() -> None:
    """Stop clusters left running by test sessions that died (their owner pid is gone)."""
    for state_dir in Path(tempfile.gettempdir()).glob(f"{STATE_PREFIX}*"):
        try:
            os.kill(int((state_dir / "owner.pid").read_text()), 0)
            continue  # its session is still running
        except (ProcessLookupError, FileNotFoundError, ValueError):
            pass  # owner gone, or a session that failed before recording itself
        except OSError:
            continue
        env = dict(os.environ, CMKD_SLURM_DIR=str(state_dir))
        subprocess.run([str(LAUNCH / "cluster_down.sh")], env=env, timeout=180, check=False)
        shutil.rmtree(state_dir, ignore_errors=True)


_lock = threading.Lock()
_users = 0
_cluster: SlurmCluster | None = None


def _start(state_dir: Path) -> SlurmCluster:
    ctld = _free_port_run(3)  # slurmctld, then node1 and node2 on the next two ports
    nodes = ctld + 1
    env = dict(
        os.environ,
        CMKD_SLURM_DIR=str(state_dir),
        CMKD_SLURM_CTLD_PORT=str(ctld),
        CMKD_SLURM_NODE_PORT=str(nodes),
        SLURM_CONF=str(state_dir / "etc" / "slurm.conf"),
        CMKD_ROOT=str(ROOT),
        DS_ACCELERATOR="cpu",
        MLFLOW_DISABLE_TELEMETRY="true",
    )
    # sbatch reads SBATCH_*/SLURM_* input variables: keep the caller's out of the tests.
    for key in [k for k in env if k.startswith(("SBATCH_", "SLURM_")) and k != "SLURM_CONF"]:
        del env[key]
    cluster = SlurmCluster(dir=state_dir, env=env)
    proc = subprocess.run(
        [str(LAUNCH / "cluster_up.sh")], env=env, capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        subprocess.run([str(LAUNCH / "cluster_down.sh")], env=env, timeout=120, check=False)
        logs = cluster.log_tail()
        shutil.rmtree(state_dir, ignore_errors=True)
        pytest.fail(
            f"launch/cluster_up.sh failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n"
            + logs
        )
    return cluster


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """The running local cluster (2 virtual nodes x 2 CPUs); skips without root/apt."""
    global _users, _cluster
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    with _lock:  # one cluster even when several test modules import this fixture
        if _cluster is None:
            # Not under pytest's 0700 tmp root: munged runs as the munge user and needs access.
            _reap_stale_clusters()
            state_dir = Path(tempfile.mkdtemp(prefix=STATE_PREFIX))
            state_dir.chmod(0o755)
            (state_dir / "owner.pid").write_text(str(os.getpid()))
            _cluster = _start(state_dir)
        _users += 1
    try:
        yield _cluster
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                proc = subprocess.run(
                    [str(LAUNCH / "cluster_down.sh")],
                    env=_cluster.env,
                    capture_output=True,
                    text=True,
                    timeout=180,
                )
                assert proc.returncode == 0, f"cluster_down.sh failed: {proc.stderr}"
                shutil.rmtree(_cluster.dir, ignore_errors=True)
                _cluster = None

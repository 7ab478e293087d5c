"""Rank setup from torchrun / SLURM / nothing, in the one function that maps them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from cmkd_scale.dist import DistEnvError, resolve_dist_env, slurm_master_port
from tests.fixtures.slurm import SlurmCluster


def test_torchrun_variables_are_taken_as_they_are() -> None:
    env = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "h",
        "MASTER_PORT": "29500",
    }
    got = resolve_dist_env(env)
    assert (got.rank, got.world_size, got.local_rank, got.launcher) == (3, 4, 1, "torchrun")
    assert (got.master_addr, got.master_port) == ("h", 29500)
    assert not got.is_main


def test_single_process_needs_no_environment() -> None:
    env: dict[str, str] = {}
    got = resolve_dist_env(env)
    assert (got.rank, got.world_size, got.local_rank, got.launcher) == (0, 1, 0, "single")
    assert env["RANK"] == "0" and env["WORLD_SIZE"] == "1" and env["MASTER_ADDR"] == "127.0.0.1"
    # a port nothing listens on: the store can bind it
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", int(env["MASTER_PORT"])))


def test_slurm_variables_map_to_torch_ones() -> None:
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_ID": "123456",
        "MASTER_ADDR": "node7",  # exported by the sbatch script: no scontrol needed
    }
    got = resolve_dist_env(env)
    assert (got.rank, got.world_size, got.local_rank, got.launcher) == (5, 8, 1, "slurm")
    assert got.master_port == slurm_master_port("123456") == 20000 + 123456 % 20000
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("5", "8", "1")


def test_torchrun_wins_over_slurm_inside_an_allocation() -> None:
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}
    env |= {"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert resolve_dist_env(env).launcher == "torchrun"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
        ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "outside"),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, "SLURM_JOB_NODELIST is not set"),
    ],
)
def test_bad_environments_say_what_to_fix(env: dict[str, str], message: str) -> None:
    with pytest.raises(DistEnvError, match=message):
        resolve_dist_env(dict(env))


_PROBE = (
    "import json, os; from cmkd_scale.dist import resolve_dist_env; e = resolve_dist_env(); "
    "print(json.dumps({'rank': e.rank, 'world': e.world_size, 'local': e.local_rank, "
    "'addr': e.master_addr, 'port': e.master_port, 'launcher': e.launcher, "
    "'job': os.environ['SLURM_JOB_ID'], 'node': os.environ['SLURMD_NODENAME']}))"
)


@pytest.mark.slurm
def test_srun_tasks_on_two_nodes_get_ranks_and_a_master(slurm_cluster: SlurmCluster) -> None:
    """A real 2-node srun: ranks from SLURM_PROCID, MASTER_ADDR via `scontrol show hostnames`."""
    proc = slurm_cluster.run(
        "srun", "--nodes=2", "--ntasks-per-node=1", sys.executable, "-c", _PROBE, timeout=180
    )
    rows = sorted((json.loads(line) for line in proc.stdout.splitlines()), key=lambda r: r["rank"])
    assert [r["rank"] for r in rows] == [0, 1]
    assert {r["world"] for r in rows} == {2} and {r["local"] for r in rows} == {0}
    assert {r["launcher"] for r in rows} == {"slurm"}
    assert len({r["node"] for r in rows}) == 2  # really two (virtual) nodes
    hosts = slurm_cluster.run("scontrol", "show", "hostnames", "node[1-2]").stdout.split()
    expected_port = slurm_master_port(rows[0]["job"])
    assert {(r["addr"], r["port"]) for r in rows} == {(hosts[0], expected_port)}


def test_a_single_process_run_binds_no_port(tmp_path) -> None:
    """Runs started side by side cannot collide: one process makes its group on no port.

    MASTER_PORT points at a port another socket already listens on (what a released free
    port becomes when another process's connection takes it); the group still comes up.
    """
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = (
            "import os, torch\n"
            "from cmkd_scale.dist import resolve_dist_env\n"
            "from cmkd_scale.train.engine import init_distributed\n"
            "init_distributed(resolve_dist_env(), collective_timeout_s=60)\n"
            "t = torch.ones(2); torch.distributed.all_reduce(t)\n"
            "print('world', torch.distributed.get_world_size(), t.tolist())\n"
        )
        env = {k: v for k, v in os.environ.items() if k not in _RANK_VARS}
        env["MASTER_PORT"] = str(port)
        proc = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world 1 [1.0, 1.0]" in proc.stdout


_RANK_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "MASTER_ADDR"}

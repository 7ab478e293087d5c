"""Train on one machine with restarts: torchrun with ``--max-restarts`` from the config.

    python -m cmkd_scale.train.launch --nproc-per-node 8 --config configs/X.yaml [key=value ...]

Runs ``torch.distributed.run`` (``--standalone``) with ``--max-restarts run.max_restarts``:
when a rank dies, or a collective times out because one hangs (``run.collective_timeout_s``),
torchrun stops the other ranks (SIGTERM, SIGKILL after ``--shutdown-timeout`` seconds) and
starts all of them again; they resume from the newest intact checkpoint. When the restarts are
used up it prints the summary of ``run.dir/failures.jsonl`` and exits with torchrun's code.
SIGTERM/SIGINT/SIGUSR1 sent to this process go to torchrun (and so to every rank: a
preemption checkpoint). On SLURM use ``launch/train.sbatch`` instead (requeue, same counter).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from cmkd_scale.config import ConfigError, load_config
from cmkd_scale.train import restarts


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cmkd_scale.train.launch", description=__doc__)
    p.add_argument("--nproc-per-node", type=int, default=1, help="ranks (GPUs) on this machine")
    p.add_argument(
        "--shutdown-timeout",
        type=int,
        default=30,
        help="seconds torchrun waits for the other ranks to exit before SIGKILL (a stopped or "
        "hung rank is killed after this)",
    )
    p.add_argument(
        "--monitor-interval", type=float, default=0.5, help="how often torchrun checks its ranks"
    )
    p.add_argument("--config", type=Path, required=True, help="YAML preset (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    return p.parse_args(argv)


def torchrun_command(args: argparse.Namespace, max_restarts: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={args.nproc_per_node}",
        f"--max-restarts={max_restarts}",
        f"--monitor-interval={args.monitor_interval}",
        f"--shutdown-timeout={args.shutdown_timeout}",
        "-m",
        "cmkd_scale.train",
        "--config",
        str(args.config),
        *args.overrides,
    ]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"python -m cmkd_scale.train.launch: {exc}", file=sys.stderr)
        return 2
    run_dir, max_restarts = Path(cfg.run.dir), cfg.run.max_restarts
    proc = subprocess.Popen(torchrun_command(args, max_restarts))

    def forward(signum: int, _frame: object) -> None:
        proc.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, forward)
    rc = proc.wait()
    if rc != 0:
        restarts.record(
            run_dir,
            {
                "source": "launcher",
                "launcher": "torchrun",
                "job": "",
                "attempt": max_restarts + 1,
                "exit_code": rc,
            },
        )
        print(
            f"cmkd_scale.train.launch: torchrun exited with {rc} after up to {max_restarts} "
            "restart(s)\n" + restarts.summary(run_dir, max_restarts=max_restarts),
            file=sys.stderr,
            flush=True,
        )
    return rc


if __name__ == "__main__":
    sys.exit(main())

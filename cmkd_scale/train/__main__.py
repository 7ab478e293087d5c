"""Train a student (with or without a frozen teacher) on DeepSpeed ZeRO.

    python -m cmkd_scale.train --config configs/debug_cpu.yaml [key.sub=value ...]
    torchrun --nproc_per_node 8 -m cmkd_scale.train --config ...      # or one srun task per rank

The loop is in trainer.py; this module parses, builds the trainer, trains and closes.
"""

from __future__ import annotations

import signal

# Preemption can come while the heavy imports below still run (20-60 s on a busy node): note it
# now, so the trainer stops after its first step instead of being killed without a checkpoint.
_EARLY_SIGNALS: list[int] = []
if __name__ == "__main__":
    for _signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(_signum, lambda signum, _frame: _EARLY_SIGNALS.append(signum))

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from cmkd_scale.config import ConfigError, load_config
from cmkd_scale.logs import setup_logging
from cmkd_scale.train.scale import resolve_scale, world_size_from_env

# torch, DeepSpeed and the trainer are imported in main(), after the batch split for this
# world size has been checked: an impossible split is refused in well under a second.


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cmkd_scale.train", description=__doc__)
    p.add_argument("--config", type=Path, required=True, help="YAML preset (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument(
        "--plan",
        action="store_true",
        help="print the batch split and effective lr for --world-size (or the launcher's) "
        "and exit without training",
    )
    p.add_argument(
        "--world-size", type=int, default=0, help="with --plan: ranks to plan for (default: env)"
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the config, build the trainer, train, and close with the right status."""
    args = _parse_args(argv)
    setup_logging()
    cfg = load_config(args.config, args.overrides)
    world_size = args.world_size or world_size_from_env()
    try:
        plan = resolve_scale(cfg, world_size)
    except ConfigError as exc:
        print(f"python -m cmkd_scale.train: {exc}", file=sys.stderr)
        return 2
    if args.plan:
        print(plan.describe())
        print(plan.warning(cfg.optim) or "global batch = the reference batch (or none stated)")
        return 0

    from cmkd_scale.dist import EXIT_REQUEUE
    from cmkd_scale.train import engine
    from cmkd_scale.train.trainer import Trainer

    engine.ds_env_defaults()
    # DeepSpeed calls torch.distributed functions torch has deprecated: not our users' concern
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    from cmkd_scale.train import restarts

    restarts.announce_attempt(cfg.run.max_restarts)
    trainer: Trainer | None = None
    status, note = "FAILED", "crashed; resume from checkpoints/latest"
    try:
        trainer = Trainer(cfg, early_signals=_EARLY_SIGNALS)
        code = trainer.train()
        if code == EXIT_REQUEUE:
            restarts.mark_preempted(Path(cfg.run.dir), is_main=trainer.is_main)
            status = "KILLED"
            note = f"preempted at step {trainer.state.global_step}; requeue resumes it"
        else:
            report = trainer.report or {}
            status = "FINISHED"
            note = f"reports {report.get('model')}: eval mAP {report.get('mAP', float('nan')):.4f}"
        return code
    except Exception as exc:
        # a lost/hung rank or a full disk: one message, a record in failures.jsonl and an exit
        # code the launchers act on; anything else is re-raised with its traceback
        step = trainer.state.global_step if trainer is not None else 0
        code = restarts.exit_code_for(exc, Path(cfg.run.dir), step=step)
        if code == restarts.EXIT_RANK_LOST:
            # the process group is broken: closing DALI and the group only delays the restart
            if trainer is not None:
                trainer.tracker.finish(status, f"a rank was lost at step {step}")
            restarts.exit_now(code)
        return code
    finally:
        if trainer is not None:
            trainer.close(status, note)


if __name__ == "__main__":
    sys.exit(main())

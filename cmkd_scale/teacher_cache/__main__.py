"""Run a frozen teacher once over every (training sample, view) and store its logits.

    python -m cmkd_scale.teacher_cache --config configs/X.yaml --views V --out DIR [--top-k K]
                                       [key.sub=value ...]
    torchrun --nproc_per_node 8 -m cmkd_scale.teacher_cache ...   # or one srun task per rank
    ... --task-id I --num-tasks N   (a SLURM array task; then --finalize once, see launch/)

The config is the KD recipe the students will train with: its data.* (shards, features,
augmentation), run.seed and teacher.* decide the cache. A student then trains with
``data.views=V teacher.cache=DIR`` and the teacher is never built. A killed pass is rerun with
the same command: complete parts are kept, the missing ones computed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from cmkd_scale.config import ConfigError, load_config
from cmkd_scale.logs import setup_logging


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m cmkd_scale.teacher_cache",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, help="the students' KD recipe (YAML)")
    p.add_argument("--out", type=Path, required=True, help="the cache folder")
    p.add_argument("--views", type=int, default=0, help="views per sample (default: data.views)")
    p.add_argument("--top-k", type=int, default=0, help="keep the top K logits (0: all, fp16)")
    p.add_argument("--views-per-file", type=int, default=0, help="0: all views of a shard")
    p.add_argument("--batch-size", type=int, default=32, help="teacher batch (inference only)")
    p.add_argument("--task-id", type=int, default=None, help="SLURM array task (default: rank)")
    p.add_argument("--num-tasks", type=int, default=None, help="SLURM array size")
    p.add_argument("--finalize", action="store_true", help="only write the manifest if complete")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    setup_logging()
    prog = "python -m cmkd_scale.teacher_cache"
    try:
        from cmkd_scale.teacher_cache.compute import PassSettings, describe, finalize, run_pass

        if args.finalize:  # the SLURM array's last job: no config needed
            done = finalize(args.out)
            if not done:
                print(
                    f"{prog}: {args.out} is not complete; rerun the missing tasks", file=sys.stderr
                )
                return 1
        else:
            if args.config is None:
                raise ConfigError("--config is required (the students' KD recipe)")
            overrides = list(args.overrides)
            if args.views:
                overrides.append(f"data.views={args.views}")
            cfg = load_config(args.config, overrides)
            from cmkd_scale import dist

            env = dist.resolve_dist_env()
            worker, workers = env.rank, env.world_size
            if args.task_id is not None or args.num_tasks is not None:
                worker, workers = args.task_id or 0, args.num_tasks or 1
            if not 0 <= worker < workers:
                raise ConfigError(f"--task-id {worker} is outside 0..{workers - 1}")
            settings = PassSettings(
                top_k=args.top_k,
                views_per_part=args.views_per_file,
                batch_size=args.batch_size,
                worker=worker,
                workers=workers,
            )
            done = run_pass(cfg, args.out, settings, dist.device_for(env))
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    if done:
        print(describe(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

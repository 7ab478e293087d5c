"""The study's teacher caches (``teacher_cache.views > 0``): one cache pass per teacher, before
the KD rows, which then train with ``teacher.cache`` and never build their teacher.

A cache depends on the teacher and on the student's data settings it was fed (features,
augmentation, views, view seed, training shards); KD rows that share all of them (e.g. every
seed of ``cnn2ast``, and ``cnn2cnn`` with the same data settings) share one cache, found under
``OUT/teacher_cache/<teacher family>-<digest of those settings>``. A finished cache (its
manifest written) is reused by a rerun; an unfinished one is completed (the pass keeps its
complete parts).
"""

from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from cmkd_scale.config import Config
from cmkd_scale.distill.logit_cache import AUGMENT_KEYS, FEATURE_KEYS, MANIFEST
from cmkd_scale.study.config import ROOT, StudyConfig
from cmkd_scale.study.plan import Training
from cmkd_scale.study.runner import StudyError, child_env, log_tail, python_command

Echo = Callable[[str], None]


def cache_dir(out: Path, training: Training, cfg: Config) -> Path:
    """Where the cache of this KD training's teacher, for its data settings, lives."""
    settings = {
        "teacher": training.teacher,
        "features": {k: getattr(cfg.data, k) for k in FEATURE_KEYS},
        "augment": {k: getattr(cfg.data, k) for k in AUGMENT_KEYS},
        "views": cfg.data.views,
        "view_seed": cfg.data.view_seed,
        "train": cfg.data.train,
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return out / "teacher_cache" / f"{training.teacher}-{digest}"


def cache_args(study: StudyConfig, recipe: Path, items: list[str], cache: Path) -> list[str]:
    """The arguments of ``python -m cmkd_scale.teacher_cache`` for one KD training's config."""
    return [
        "--config", str(recipe), "--out", str(cache),
        "--top-k", str(study.teacher_cache.top_k),
        "--batch-size", str(study.teacher_cache.batch_size), *items,
    ]  # fmt: skip


def ensure_cache(
    study: StudyConfig, recipe: Path, items: list[str], cache: Path, log: Path, echo: Echo
) -> None:
    """Run the cache pass for ``cache`` unless it is finished; raise naming the log on failure."""
    if (cache / MANIFEST).is_file():
        echo(f"teacher cache {cache}: finished, reused")
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if study.launch.mode == "slurm":
        cmd = [
            "sbatch", "--parsable", "--wait", f"--job-name=cmkd-{study.name}-teacher-cache",
            f"--output={log}", *study.launch.sbatch_args,
            str(ROOT / "launch" / "teacher_cache.sbatch"),
            *cache_args(study, recipe, items, cache),
        ]  # fmt: skip
        echo(f"teacher cache {cache}: SLURM job (log {log})")
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env={**child_env(), "CMKD_ROOT": str(ROOT)}
        )
        output = proc.stderr.strip()
    else:
        module = ["-m", "cmkd_scale.teacher_cache", *cache_args(study, recipe, items, cache)]
        cmd = python_command(module, study.launch.nproc)
        echo(f"teacher cache {cache}: computing (log {log})")
        with log.open("w") as fh:
            fh.write(f"$ {shlex.join(cmd)}\n")
            fh.flush()
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=child_env())
        output = ""
    wall = time.monotonic() - started
    if proc.returncode != 0 or not (cache / MANIFEST).is_file():
        raise StudyError(
            f"the teacher cache pass for {cache} failed (exit {proc.returncode}) after "
            f"{wall:.0f} s; {output}\nits log {log} ends with:\n{log_tail(log)}\nFix the cause "
            "and rerun the study command: the pass keeps the parts it finished."
        )
    echo(f"teacher cache {cache}: done in {wall:.0f} s")

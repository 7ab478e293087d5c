"""What a run keeps in its directory besides checkpoints, and the run's tracker.

Rank 0 writes the resolved config (``config.yaml``) and the generated DeepSpeed JSON
(``deepspeed.json``); the tracker's run id is kept in the trainer state and in
``tracker_run_id``, so a resumed run continues the same MLflow run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from cmkd_scale import dist
from cmkd_scale.config import Config
from cmkd_scale.tracking import Tracker, make_tracker
from cmkd_scale.train.checkpoint import TrainerState

log = logging.getLogger(__name__)


def write_run_files(cfg: Config, run_dir: Path, ds_json: dict[str, Any], *, is_main: bool) -> None:
    """Rank 0: the resolved config and the generated DeepSpeed JSON, in the run dir."""
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        (run_dir / "deepspeed.json").write_text(json.dumps(ds_json, indent=2) + "\n")
    dist.barrier()


def warn_config_changes(saved: dict[str, Any], now: dict[str, Any]) -> None:
    """Name every setting that differs from the checkpoint's on resume."""
    for section, values in now.items():
        for key, value in values.items():
            before = saved.get(section, {}).get(key)
            if before != value and not isinstance(value, tuple):
                log.warning("config %s.%s changed on resume: %r -> %r", section, key, before, value)


def open_tracker(
    cfg: Config,
    env: dist.DistEnv,
    run_dir: Path,
    state: TrainerState,
    *,
    resumed_from: str | None,
    extra_params: dict[str, Any] | None = None,
) -> Tracker:
    """The run's tracker (a no-op one on ranks > 0); a resumed run continues its MLflow run."""
    id_file = run_dir / "tracker_run_id"
    run_id = state.tracker_run_id
    if run_id is None and env.is_main and id_file.is_file():
        run_id = id_file.read_text().strip() or None
    tracker = make_tracker(cfg, rank=env.rank, run_dir=run_dir, resume_run_id=run_id)
    if env.is_main and cfg.tracking.enabled:
        state.tracker_run_id = tracker.run_id
        if tracker.run_id:
            id_file.write_text(str(tracker.run_id))
        if run_id is None:
            tracker.log_params({**cfg.flat(), **(extra_params or {})})
        tracker.log_artifact(run_dir / "deepspeed.json")
    tracker.set_tags(
        {
            "world_size": str(env.world_size),
            "launcher": env.launcher,
            "resumed_from": resumed_from or "",
        }
    )
    return tracker

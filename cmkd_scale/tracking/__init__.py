"""Experiment tracking with MLflow (the ``mlflow`` import is in remote.py only).

Tracking is never a reason for training to stop. Rank 0 gets an ``MlflowTracker``, every other
rank a no-op ``Tracker`` (decided once in ``make_tracker``). Every call is first appended to the
run directory's journal (``RUN_DIR/tracking/journal.jsonl``, see journal.py) and then
handed to a background thread (sender.py) that batches metrics into ``log_batch``
calls; the training thread never waits for HTTP. A dead or absent server costs one warning;
what it missed is sent when it returns, or later by::

    python -m cmkd_scale.tracking upload --run-dir RUN_DIR [--uri URI]   # idempotent

Where runs go: ``cfg.tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else the embedded store
``sqlite:///RUN_DIR/mlflow.db`` with artifacts in ``RUN_DIR/mlartifacts``, opened with::

    mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow.db --port 5000

Trainer usage (rank 0 logs; the same calls on every rank are harmless)::

    tracker = make_tracker(cfg, rank=rank, run_dir=run_dir, resume_run_id=ckpt.get("run_id"))
    with tracker:                          # FINISHED / FAILED (exception) / KILLED (signal)
        tracker.log_params(cfg.flat())
        tracker.set_tags({...})            # optional: tags of your own
        tracker.log_dict(ds_config, "deepspeed.json")
        ... per optimizer step (or every run.log_every_steps):
        tracker.log_metrics({"loss": .., "loss_label": .., "loss_kd": .., "lr": ..,
                             "grad_norm": .., "clips_per_s": .., "data_wait_frac": ..,
                             "teacher_ms": .., "gpu_peak_mem_gb": ..}, step)
        ... per evaluation (stats: dict with mAP, mAUC, dprime, AP, AUC; or an EvalResult):
        tracker.log_eval(stats, step, epoch, class_names)             # student
        tracker.log_eval(teacher_stats, step, epoch, class_names, prefix="teacher")
        ... checkpoint: save tracker.run_id with it (pass it back as resume_run_id)
        tracker.log_checkpoint(export_path)  # uploads it (cfg.tracking.log_checkpoint) or tags
    # on SIGTERM/preemption, after saving the resume checkpoint:
    tracker.finish("KILLED", note=f"resume from {ckpt_path} at step {step}")

``finish`` is idempotent; ``with tracker:`` calls it from the exception it sees (KeyboardInterrupt
and SystemExit count as KILLED) and an exit without it marks the run FAILED.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cmkd_scale.tracking.base import Tracker

__all__ = ["Tracker", "make_tracker"]


def make_tracker(
    cfg: Any, *, rank: int, run_dir: Path, resume_run_id: str | None = None
) -> Tracker:
    """Decide once: rank 0 gets a real tracker, every other rank (and a run with tracking
    disabled) a no-op that never imports MLflow."""
    if rank != 0 or not cfg.tracking.enabled:
        return Tracker()
    from cmkd_scale.tracking.mlflow_tracker import MlflowTracker

    return MlflowTracker(cfg, run_dir=Path(run_dir), resume_run_id=resume_run_id)

"""The end of a run: which model it reports, and that model's one evaluation on the eval set.

"Choose on validation, report on eval":

- with ``data.val``, every evaluation during training scores the val set and ``models/best.pt``
  is the best of them by ``eval.select_metric``: the reported model is ``best``;
- without it nothing is chosen (``best.pt`` is not written): as AST, the reported model is the
  weight average of the epoch exports ``eval.wa_start_epoch..wa_end_epoch`` (``models/wa.pt``,
  averaged as ``python -m cmkd_scale.evaluate --wa`` does) when that range is set, else the
  final model (``models/final.pt``).

The eval set (``data.eval``) is read once, at the very end, for that model only, and written
as ``eval/report_{summary.json,class_ap.csv,predictions.npz}``. ``report_summary.json``::

    {"model": "best"|"wa"|"final", "checkpoint": "models/best.pt", "selected_on": "val"|null,
     "select_metric": "mAP"|"acc"|null, "epoch": 3|null, "step": 12,
     "mAP": .., "mAUC": .., "dprime": .., "acc": ..,     # on data.eval
     "val": {the chosen model's val summary}|null}

A KD recipe's ``teacher.checkpoint`` names the model its teacher's recipe reports
(:func:`reported_checkpoint`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmkd_scale.config import Config

log = logging.getLogger(__name__)

NAME = "report"  # eval/report_*, the tracker's report/* metrics
SUMMARY = f"{NAME}_summary.json"
EXPORTS = {"best": "best.pt", "wa": "wa.pt", "final": "final.pt"}


def reported_model(cfg: Config) -> str:
    """The model a run of ``cfg`` reports: ``best`` (chosen on val), ``wa`` or ``final``."""
    if cfg.data.val:
        return "best"
    if cfg.eval.wa_start_epoch and cfg.eval.wa_end_epoch:
        return "wa"
    return "final"


def reported_checkpoint(cfg: Config) -> str:
    """Its export, relative to the run dir (``models/best.pt``, ``models/wa.pt`` ...)."""
    return f"models/{EXPORTS[reported_model(cfg)]}"


@dataclass
class Choice:
    """The reported model: which, its export, where it was taken, its val summary."""

    model: str  # best | wa | final
    export: Path
    epoch: int | None
    step: int
    val: dict[str, float] | None = None
    select_metric: str | None = None

    def relative(self, run_dir: Path) -> str:
        try:
            return str(self.export.relative_to(run_dir))
        except ValueError:
            return str(self.export)


def summary_dict(choice: Choice, run_dir: Path, eval_summary: dict[str, float]) -> dict[str, Any]:
    """The content of ``eval/report_summary.json``."""
    return {
        "model": choice.model,
        "checkpoint": choice.relative(run_dir),
        "selected_on": "val" if choice.val is not None else None,
        "select_metric": choice.select_metric if choice.val is not None else None,
        "epoch": choice.epoch,
        "step": choice.step,
        **{k: float(eval_summary[k]) for k in ("mAP", "mAUC", "dprime", "acc")},
        "val": dict(choice.val) if choice.val is not None else None,
    }


def previous_report(out_dir: Path, choice: Choice, run_dir: Path) -> dict[str, Any] | None:
    """The report an earlier process of this run already wrote for this very choice, if any
    (a finished run started again must not score the eval set a second time)."""
    path = out_dir / SUMMARY
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("%s unreadable (%s): reporting again", path, exc)
        return None
    same = (
        saved.get("model") == choice.model
        and saved.get("checkpoint") == choice.relative(run_dir)
        and saved.get("step") == choice.step
        and saved.get("epoch") == choice.epoch
    )
    return saved if same else None


def weight_average(run_dir: Path, start: int, end: int) -> Path | None:
    """Rank 0: ``models/wa.pt`` = the mean of the epoch exports start..end, as
    ``python -m cmkd_scale.evaluate --wa``; None (with the reason logged) when an epoch export
    is missing, e.g. a run that ``run.max_steps`` ended before epoch ``end``."""
    from cmkd_scale.evaluate.averaging import average_weights, wa_paths

    try:
        paths = wa_paths(run_dir, start, end)
    except (FileNotFoundError, ValueError) as exc:
        log.warning("no weight average (eval.wa_start_epoch..wa_end_epoch): %s", exc)
        return None
    dest = run_dir / "models" / EXPORTS["wa"]
    average_weights(paths).save(dest)
    log.info("weight average of epochs %d..%d -> %s", start, end, dest)
    return dest

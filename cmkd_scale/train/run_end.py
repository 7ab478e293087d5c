"""The end of a run, on the trainer's components: choose the reported model, score it on eval.

``choose`` picks ``best`` (chosen on data.val), the weight average or the final model
(train/report.py says which and why); ``write_report`` reads the eval set once, for that model
only, and writes ``eval/report_*`` and the tracker's ``report/*`` metrics. Both run on every
rank: exports and the weight average are written by rank 0 and the decision broadcast.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from cmkd_scale import dist
from cmkd_scale.models.exported import copy_export
from cmkd_scale.train.report import NAME as REPORT
from cmkd_scale.train.report import SUMMARY as REPORT_SUMMARY
from cmkd_scale.train.report import (
    Choice,
    previous_report,
    reported_model,
    summary_dict,
    weight_average,
)

if TYPE_CHECKING:
    from cmkd_scale.config import Config
    from cmkd_scale.tracking import Tracker
    from cmkd_scale.train.checkpoint import CheckpointManager, TrainerState
    from cmkd_scale.train.evaluator import TrainEvaluator
    from cmkd_scale.train.loaders import RunLoaders
    from cmkd_scale.train.step_metrics import JsonlLog

log = logging.getLogger(__name__)


class EndingRun(Protocol):
    """What the end of a run reads of the trainer (``Trainer`` passes itself)."""

    state: TrainerState
    cfg: Config
    ckpt: CheckpointManager
    run_dir: Path
    is_main: bool
    steps_per_epoch: int
    loaders: RunLoaders
    evaluator: TrainEvaluator
    device: torch.device
    class_names: list[str]
    tracker: Tracker
    metrics_log: JsonlLog

    def export(self, tag: str, filename: str) -> Path: ...


def choose(t: EndingRun, final: Path) -> Choice:
    """The model the run reports: best on val, else the weight average, else final."""
    state, cfg = t.state, t.cfg
    models = t.ckpt.models_dir
    last_epoch = state.epoch - 1 if state.batch_in_epoch == 0 else state.epoch
    final_choice = Choice("final", final, epoch=last_epoch, step=state.global_step)
    if cfg.data.val:
        if not state.best_tag:
            log.warning("no evaluation on data.val chose a model: reporting the final model")
            return final_choice
        _heal_best_export(t)
        return Choice(
            "best",
            models / "best.pt",
            epoch=state.best_epoch,
            step=state.best_step,
            val=dict(state.best_summary),
            select_metric=state.best_metric,
        )
    start, end = cfg.eval.wa_start_epoch, cfg.eval.wa_end_epoch
    wanted = reported_model(cfg)
    log.info(
        "no data.val: no model is chosen on the eval set, so models/best.pt is not written; "
        "the run reports %s",
        f"the weight average of epochs {start}..{end} (models/wa.pt)"
        if wanted == "wa"
        else "the final model (models/final.pt)",
    )
    if wanted == "wa":
        averaged = weight_average(t.run_dir, start, end) if t.is_main else None
        if dist.broadcast_object(averaged is not None):  # also: wa.pt is on disk now
            step = min(end * t.steps_per_epoch, state.global_step)
            return Choice("wa", models / "wa.pt", epoch=None, step=step)
        log.warning("reporting the final model instead of the weight average")
    return final_choice


def _heal_best_export(t: EndingRun) -> None:
    """best.pt must be the chosen checkpoint's student (a crash can fall between them)."""
    from cmkd_scale.models.exported import Export

    best, tag = t.ckpt.models_dir / "best.pt", t.state.best_tag
    stale = False
    if t.is_main:
        stale = not best.is_file() or Export.load(best).source_checkpoint != tag
    if dist.broadcast_object(stale):
        log.warning("models/best.pt is not %s's student: writing it again", tag)
        epoch_export = t.ckpt.models_dir / f"{tag}.pt"  # its checkpoint may be pruned
        if tag.startswith("epoch-") and epoch_export.is_file():
            if t.is_main:
                copy_export(epoch_export, best)
            dist.barrier()
        else:
            t.export(tag, "best.pt")


def write_report(t: EndingRun, choice: Choice) -> dict[str, Any]:
    """Score the reported model on the eval set, once; write eval/report_*."""
    from cmkd_scale.evaluate.scoring import evaluate, save_result
    from cmkd_scale.models.exported import Export

    state, out_dir = t.state, t.run_dir / "eval"
    saved = previous_report(out_dir, choice, t.run_dir) if t.is_main else None
    saved = dist.broadcast_object(saved)
    if saved is not None:
        log.info(
            "report of %s already written by an earlier process of this run: the eval set "
            "is not scored again",
            saved["checkpoint"],
        )
        return saved  # type: ignore[return-value]
    loader = t.loaders.for_report()
    result = None
    if choice.model == "final" and t.evaluator.split == "eval":
        result = t.evaluator.latest(state.global_step)  # these weights, scored just now
    if result is None:
        model = Export.load(choice.export).model(t.device)

        def forward(fbank: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(model(fbank).float())

        result = evaluate(forward, loader, device=t.device)
        del model
    report = summary_dict(choice, t.run_dir, result.summary)
    epoch = choice.epoch or t.cfg.eval.wa_end_epoch or state.epoch
    if t.is_main:
        save_result(result, out_dir, REPORT, t.class_names)
        tmp = out_dir / f".{REPORT_SUMMARY}.tmp"
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, out_dir / REPORT_SUMMARY)
        t.tracker.log_eval(
            result, step=state.global_step, epoch=epoch, class_names=t.class_names,
            prefix=REPORT,
        )  # fmt: skip
        t.tracker.set_tags(
            {
                "report.model": choice.model,
                "report.checkpoint": report["checkpoint"],
                "report.selected_on": report["selected_on"] or "",
            }
        )
        t.tracker.log_artifact(out_dir / REPORT_SUMMARY, "eval")
    t.metrics_log.write(
        {"step": state.global_step, "eval": REPORT, "split": "eval", "model": choice.model,
         **result.summary}
    )  # fmt: skip
    log.info(
        "report: %s (%s) on the eval set: mAP %.4f mAUC %.4f d' %.3f acc %.4f",
        choice.model,
        report["checkpoint"],
        report["mAP"],
        report["mAUC"],
        report["dprime"],
        report["acc"],
    )
    return report

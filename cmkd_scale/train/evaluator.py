"""Evaluation during training: the student at epoch ends / every N steps, the teacher once.

Which set: ``data.val`` when the run has one -- those evaluations choose ``models/best.pt``
(by ``eval.select_metric``) and are written as ``eval/val_<name>_*``, logged as ``val/*``;
without it, the eval set, for monitoring curves only (AST's per-epoch eval): written as
``eval/<name>_*``, logged as ``eval/*``, and they choose nothing. The eval set's report of the
chosen model at the end of the run is :mod:`cmkd_scale.train.report`'s.

Every evaluation runs on all ranks (a ZeRO-3 forward needs every rank), gathers the
predictions to rank 0 once (:func:`cmkd_scale.evaluate.evaluate`), where they are written as
``eval/<prefix><name>_{predictions.npz,class_ap.csv,summary.json}`` and logged to the tracker;
every rank gets the summary back, so all of them take the same best-model decision.

Weights change only at optimizer steps, so a second evaluation at the same step (a step
evaluation that falls on an epoch end, or on the run's last step) reuses the first result: its
files are written under the second name too, without another pass over the set.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmkd_scale.evaluate.scoring import EvalResult, evaluate, save_result, score

log = logging.getLogger(__name__)

Record = Callable[[dict[str, Any]], None]  # rank 0's metrics.jsonl writer (no-op elsewhere)


class TrainEvaluator:
    """Scores the student during training and the frozen teacher once, on ``split``."""

    def __init__(
        self,
        loader: Any,
        *,
        split: str,
        device: torch.device,
        out_dir: Path,
        class_names: Sequence[str],
        is_main: bool,
        tracker: Any,
        record: Record,
    ) -> None:
        self.loader = loader
        self.split = split  # "val" (chooses best.pt) or "eval" (monitoring curves only)
        self.prefix = "" if split == "eval" else f"{split}_"  # of the files under eval/
        self.device = device
        self.out_dir = out_dir
        self.class_names = list(class_names)
        self.is_main = is_main
        self.tracker = tracker
        self.record = record
        self._teacher_result: EvalResult | None = None
        self._latest: tuple[int, str, EvalResult] | None = None  # step, name, result

    def student(
        self, model: Any, dtype: torch.dtype, name: str, *, step: int, epoch: int
    ) -> dict[str, float]:
        """Evaluate ``model`` (the DeepSpeed engine) as ``name``; its summary on every rank."""
        if self._latest is not None and self._latest[0] == step:
            return self._reuse(name, *self._latest)
        model.eval()

        def forward(fbank: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(model(fbank.to(dtype)).float())

        try:
            result = evaluate(forward, self.loader, device=self.device)
        finally:
            model.train()
        self._latest = (step, name, result)
        summary = result.summary
        if self.is_main:
            save_result(result, self.out_dir, self.prefix + name, self.class_names)
            self.tracker.log_eval(
                result, step=step, epoch=epoch, class_names=self.class_names, prefix=self.split
            )
        self.record({"step": step, "epoch": epoch, "eval": name, "split": self.split, **summary})
        log.info(
            "%s %s%s: mAP %.4f mAUC %.4f d' %.3f acc %.4f",
            self.split,
            name,
            "" if self.split == "val" else " (monitoring only: chooses nothing)",
            summary["mAP"],
            summary["mAUC"],
            summary["dprime"],
            summary["acc"],
        )
        return summary

    def latest(self, step: int) -> EvalResult | None:
        """The result of this process's evaluation at ``step``, if there was one."""
        if self._latest is not None and self._latest[0] == step:
            return self._latest[2]
        return None

    def _reuse(self, name: str, step: int, first: str, result: EvalResult) -> dict[str, float]:
        """``name`` scores the weights ``first`` already scored at ``step``: files and record."""
        if name != first:
            log.info(
                "%s %s: the weights of %s (step %d), scored once", self.split, name, first, step
            )
            if self.is_main:
                save_result(result, self.out_dir, self.prefix + name, self.class_names)
            self.record({"step": step, "eval": name, "split": self.split, **result.summary})
        return result.summary

    def teacher(self, teacher: torch.nn.Module, *, step: int, epoch: int) -> None:
        """The frozen teacher's eval, computed once per run, logged beside every student eval.

        A resumed run reads the predictions its first process saved (the teacher is frozen and
        the eval set fixed) instead of another pass. Every rank sees the same files: rank 0
        writes them only after the collective evaluation that every rank entered first.
        """
        if self._teacher_result is None:
            self._teacher_result = self._saved_teacher()
        if self._teacher_result is None:

            def forward(fbank: torch.Tensor) -> torch.Tensor:
                return torch.sigmoid(teacher(fbank))

            self._teacher_result = evaluate(forward, self.loader, device=self.device)
            summary = self._teacher_result.summary
            log.info(
                "teacher on %s: mAP %.4f mAUC %.4f", self.split, summary["mAP"], summary["mAUC"]
            )
            if self.is_main:
                save_result(
                    self._teacher_result, self.out_dir, f"{self.prefix}teacher", self.class_names
                )
        if self.is_main:
            self.tracker.log_eval(
                self._teacher_result,
                step=step,
                epoch=epoch,
                class_names=self.class_names,
                prefix=f"{self.prefix}teacher",
            )

    def _saved_teacher(self) -> EvalResult | None:
        """The teacher's evaluation saved by an earlier process of this run, if complete."""
        saved = self.out_dir / f"{self.prefix}teacher_predictions.npz"
        summary_file = self.out_dir / f"{self.prefix}teacher_summary.json"
        if not (saved.is_file() and summary_file.is_file()):
            return None
        try:
            with np.load(saved) as arrays:
                probs, targets = arrays["probs"], arrays["targets"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            log.warning("%s unreadable (%s): evaluating the teacher again", saved, exc)
            return None
        if probs.shape != (self.loader.num_samples, len(self.class_names)):
            return None  # another eval set: score the teacher again
        summary, ap, auc = score(probs, targets)
        log.info(
            "teacher on %s: mAP %.4f (saved by an earlier process of this run)",
            self.split,
            summary["mAP"],
        )
        return EvalResult(summary, ap, auc, probs, targets)

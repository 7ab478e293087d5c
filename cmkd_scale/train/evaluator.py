"""Evaluation during training: the student at epoch ends / every N steps, the teacher once.

Every evaluation runs on all ranks (a ZeRO-3 forward needs every rank), gathers the
predictions to rank 0 once (:func:`cmkd_scale.evaluate.evaluate`), where they are written as
``eval/<name>_{predictions.npz,class_ap.csv,summary.json}`` and logged to the tracker; every
rank gets the summary back, so all of them take the same best-model decision.

Weights change only at optimizer steps, so a second evaluation at the same step (a step
evaluation that falls on an epoch end, or on the run's last step) reuses the first result: its
files are written under the second name too, without another pass over the eval set.
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
    """Scores the student during training and the frozen teacher once, on the eval set."""

    def __init__(
        self,
        loader: Any,
        *,
        device: torch.device,
        out_dir: Path,
        class_names: Sequence[str],
        is_main: bool,
        tracker: Any,
        record: Record,
    ) -> None:
        self.loader = loader
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
            save_result(result, self.out_dir, name, self.class_names)
            self.tracker.log_eval(result, step=step, epoch=epoch, class_names=self.class_names)
        self.record({"step": step, "eval": name, **summary})
        log.info(
            "eval %s: mAP %.4f mAUC %.4f d' %.3f",
            name,
            summary["mAP"],
            summary["mAUC"],
            summary["dprime"],
        )
        return summary

    def _reuse(self, name: str, step: int, first: str, result: EvalResult) -> dict[str, float]:
        """``name`` scores the weights ``first`` already scored at ``step``: files and record."""
        if name != first:
            log.info("eval %s: the weights of %s (step %d), scored once", name, first, step)
            if self.is_main:
                save_result(result, self.out_dir, name, self.class_names)
            self.record({"step": step, "eval": name, **result.summary})
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
            log.info("teacher eval: mAP %.4f mAUC %.4f", summary["mAP"], summary["mAUC"])
            if self.is_main:
                save_result(self._teacher_result, self.out_dir, "teacher", self.class_names)
        if self.is_main:
            self.tracker.log_eval(
                self._teacher_result,
                step=step,
                epoch=epoch,
                class_names=self.class_names,
                prefix="teacher",
            )

    def _saved_teacher(self) -> EvalResult | None:
        """The teacher's evaluation saved by an earlier process of this run, if complete."""
        saved = self.out_dir / "teacher_predictions.npz"
        if not (saved.is_file() and (self.out_dir / "teacher_summary.json").is_file()):
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
        log.info("teacher eval: mAP %.4f (saved by an earlier process of this run)", summary["mAP"])
        return EvalResult(summary, ap, auc, probs, targets)

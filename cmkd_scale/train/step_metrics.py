"""Per-optimizer-step training metrics: to the tracker, rank 0's metrics.jsonl and the log.

One record per logged optimizer step; the loss terms are means over the step's micro-batches
(each already averaged over the ranks), so a step reads the same whatever the split into
``deepspeed.micro_batch`` x ``deepspeed.grad_accum``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


class JsonlLog:
    """Rank 0's local record of metrics (``metrics.jsonl``); a no-op elsewhere."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")


@dataclass
class StepMeter:
    """Accumulates one optimizer step's micro-batches for the per-step metrics."""

    start: float = 0.0
    micro: int = 0
    loss: float = 0.0
    label_loss: float = 0.0
    kd_loss: float = 0.0
    data_wait: float = 0.0
    teacher_ms: float = 0.0
    lr: float = 0.0

    def add(self, losses: torch.Tensor, data_wait: float, teacher_ms: float) -> None:
        self.micro += 1
        self.loss += float(losses[0])
        self.label_loss += float(losses[1])
        self.kd_loss += float(losses[2])
        self.data_wait += data_wait
        self.teacher_ms += teacher_ms


class StepReporter:
    """Turns a finished step's meter into metrics (tracker, metrics.jsonl) and a progress line."""

    def __init__(
        self,
        *,
        tracker: Any,
        jsonl: JsonlLog,
        micro_batch: int,
        world_size: int,
        total_steps: int,
        device: torch.device,
    ) -> None:
        self.tracker = tracker
        self.jsonl = jsonl
        self.micro_batch = micro_batch
        self.world_size = world_size
        self.total_steps = total_steps
        self.device = device
        self.t_start, self.step_at_start = time.perf_counter(), 0

    def start(self, step: int) -> None:
        """Training (re)starts at optimizer ``step``: the ETA counts from here."""
        self.t_start, self.step_at_start = time.perf_counter(), step

    def report(self, meter: StepMeter, *, step: int, epoch: int, grad_norm: float) -> None:
        """Log optimizer ``step``'s metrics."""
        elapsed = time.perf_counter() - meter.start
        micro = max(meter.micro, 1)
        clips = meter.micro * self.micro_batch * self.world_size
        metrics = {
            "loss": meter.loss / micro,
            "label_loss": meter.label_loss / micro,
            "kd_loss": meter.kd_loss / micro,
            "lr": meter.lr,
            "grad_norm": grad_norm,
            "clips": clips,  # clips in this optimizer step, all ranks (the global batch)
            "clips_per_s": clips / elapsed if elapsed > 0 else 0.0,
            "data_wait_frac": meter.data_wait / elapsed if elapsed > 0 else 0.0,
            "teacher_ms": meter.teacher_ms / micro,
            "epoch": epoch,
        }
        if self.device.type == "cuda":
            metrics["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
        self.tracker.log_metrics(metrics, step)
        self.jsonl.write({"step": step, **metrics})
        done = step - self.step_at_start
        per_step = (time.perf_counter() - self.t_start) / max(done, 1)
        eta = timedelta(seconds=round(per_step * (self.total_steps - step)))
        log.info(
            "epoch %d step %d/%d loss %.4f (label %.4f kd %.4f) lr %.2e %.1f clips/s "
            "data %.0f%% teacher %.1f ms ETA %s",
            epoch,
            step,
            self.total_steps,
            metrics["loss"],
            metrics["label_loss"],
            metrics["kd_loss"],
            metrics["lr"],
            metrics["clips_per_s"],
            100 * metrics["data_wait_frac"],
            metrics["teacher_ms"],
            eta,
        )

"""The training loop: a student (with or without a frozen teacher) on DeepSpeed ZeRO.

One batch's path: TrainLoader (DALI: decode, fbank, SpecAugment, mixup) -> teacher logits on
that same augmented batch (frozen, no grad) -> student logits (DeepSpeed engine) -> DistillLoss
-> engine.backward/step.  Every micro-batch ends with ONE all-reduce carrying the losses, a
non-finite flag and the preemption flag, so all ranks skip or stop at the same step.
A run dir that holds a checkpoint is resumed automatically. The command is in __main__.py.

Evaluations during training score ``data.val`` and choose ``models/best.pt`` on it, or without
a val set score the eval set for monitoring only; the eval set itself is read at the very end,
for the reported model only (report.py).
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cmkd_scale import dist
from cmkd_scale.config import Config
from cmkd_scale.diskspace import StorageError
from cmkd_scale.dist import EXIT_REQUEUE
from cmkd_scale.models.exported import copy_export, epoch_tag
from cmkd_scale.train import engine, run_end
from cmkd_scale.train.checkpoint import CheckpointManager, TrainerState, capture_rng, step_tag
from cmkd_scale.train.evaluator import TrainEvaluator
from cmkd_scale.train.loaders import open_loaders
from cmkd_scale.train.nonfinite import handle_nonfinite
from cmkd_scale.train.run_files import open_tracker, warn_config_changes, write_run_files
from cmkd_scale.train.scale import check_supported
from cmkd_scale.train.step import Agreement, EpochEnd
from cmkd_scale.train.step_metrics import JsonlLog, StepMeter, StepReporter
from cmkd_scale.train.teaching import Teaching

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # the data package loads DALI; the trainer imports it lazily
    from cmkd_scale.data.loader import Batch


class Trainer:
    """Owns the run: loaders, student engine, teacher, loss, checkpoints, tracker."""

    def __init__(self, cfg: Config, *, early_signals: Sequence[int] = ()) -> None:
        """Build everything; ``early_signals``: preemption signals seen before this ran."""
        from cmkd_scale.distill.loss import DistillLoss
        from cmkd_scale.models import build_model, load_pretrained

        self.cfg = cfg
        self.env = dist.resolve_dist_env()
        # the batch split and lr for this world size, refused before any process group exists
        self.plan = check_supported(cfg, self.env.world_size)
        engine.init_distributed(self.env, collective_timeout_s=cfg.run.collective_timeout_s)
        self.device = dist.device_for(self.env)
        self.run_dir = Path(cfg.run.dir)
        self.is_main = self.env.is_main
        if cfg.run.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.stop_requested = bool(early_signals)
        if early_signals:
            log.warning("preemption signal during start-up: stopping after the first step")
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, self._on_preempt)
        dist.set_cpu_threads(self.device)
        log.info("%s", dist.describe(self.env, self.device))

        ds, plan = cfg.deepspeed, self.plan
        if self.is_main:
            log.info("batch: %s", plan.describe())
            if plan.warning(cfg.optim):
                log.warning("%s", plan.warning(cfg.optim))
        self.loaders = open_loaders(cfg, plan, self.env, on_gpu=self.device.type == "cuda")
        self.train_loader = self.loaders.train
        self.num_classes = self.loaders.num_classes
        self.class_names = list(self.train_loader.class_names)
        # Whole optimizer steps per epoch; a tail of < grad_accum micro-batches is dropped.
        self.steps_per_epoch = self.train_loader.steps_per_epoch // plan.grad_accum
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"an epoch has {self.train_loader.steps_per_epoch} micro-batches per rank, fewer "
                f"than grad_accum {plan.grad_accum} ({plan.describe()}); lower "
                "deepspeed.global_batch or raise deepspeed.micro_batch"
            )
        self.total_steps = cfg.run.epochs * self.steps_per_epoch
        if cfg.run.max_steps:
            self.total_steps = min(self.total_steps, cfg.run.max_steps)

        # Same seed on every rank: identical initial students (ZeRO partitions each rank's copy).
        torch.manual_seed(cfg.run.seed)
        dims = {"input_tdim": cfg.data.target_length, "input_fdim": cfg.data.num_mel_bins}
        student = build_model(cfg.model, num_classes=self.num_classes, **dims)
        if cfg.model.checkpoint:
            # Fine-tuning start (e.g. an AudioSet model for ESC-50): a head of another size
            # stays new, with a warning naming it; the teacher below always loads strictly.
            load_pretrained(student, cfg.model.checkpoint, strict=False)
        self.teaching = Teaching(  # online, from a cache, or none
            cfg,
            shard_list=self.train_loader.shards.shards,
            num_classes=self.num_classes,
            device=self.device,
        )
        self.loss_fn = DistillLoss(cfg.distill)
        self.dtype = engine.compute_dtype(cfg)
        self.engine, ds_json = engine.build_engine(
            cfg,
            student.to(self.device),
            world_size=self.env.world_size,
            steps_per_epoch=self.steps_per_epoch,
            total_steps=self.total_steps,
            plan=plan,
        )
        # from here on a collective that waits longer (a hung or stopped rank) raises
        engine.set_collective_timeout(cfg.run.collective_timeout_s)
        torch.manual_seed(cfg.run.seed + 1000 * self.env.rank)  # per-rank dropout streams
        n_params = sum(p.numel() for p in student.parameters())
        log.info("student %s: %.2f M params", cfg.model.name, n_params / 1e6)

        self.ckpt = CheckpointManager(
            self.run_dir,
            rank=self.env.rank,
            zero_stage=ds.zero_stage,
            keep=cfg.run.keep_checkpoints,
            keep_epochs=cfg.run.keep_epoch_checkpoints,
            world_size=self.env.world_size,
            estimated_bytes=engine.estimated_checkpoint_bytes(cfg, student),
        )
        self.state = TrainerState(config=cfg.to_dict(), world_size=self.env.world_size)
        latest = self.ckpt.resume_tag()  # the newest intact one; broken ones are set aside
        if latest is not None:
            self.state = self.ckpt.load(self.engine, latest)
            if self.state.loader:
                self.train_loader.load_state_dict(self.state.loader)
            warn_config_changes(self.state.config, cfg.to_dict())
            self.state.config = cfg.to_dict()
            self._check_selection()
        self.resumed_from = latest
        write_run_files(cfg, self.run_dir, ds_json, is_main=self.is_main)
        self.tracker = open_tracker(
            cfg,
            self.env,
            self.run_dir,
            self.state,
            resumed_from=self.resumed_from,
            extra_params=plan.params(),  # effective.global_batch etc. beside cfg.flat()
        )
        self.metrics_log = JsonlLog(self.run_dir / "metrics.jsonl" if self.is_main else None)
        self.reporter = StepReporter(
            tracker=self.tracker,
            jsonl=self.metrics_log,
            micro_batch=plan.micro_batch,
            world_size=self.env.world_size,
            total_steps=self.total_steps,
            device=self.device,
        )
        self.samples_log = None
        if cfg.run.record_samples:
            (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
            self.samples_log = JsonlLog(self.run_dir / "samples" / f"rank{self.env.rank}.jsonl")
        self.evaluator = TrainEvaluator(
            self.loaders.val or self.loaders.eval,
            split="val" if cfg.data.val else "eval",
            device=self.device,
            out_dir=self.run_dir / "eval",
            class_names=self.class_names,
            is_main=self.is_main,
            tracker=self.tracker,
            record=self.metrics_log.write,
        )
        self._last_saved_step = self.state.global_step if latest else -1
        self.report: dict[str, Any] | None = None  # report_summary.json, once written
        self._grad_norm: float | None = None  # the last step's, where DeepSpeed keeps none

    # ------------------------------------------------------------------ setup helpers

    def _check_selection(self) -> None:
        """A resumed run keeps its best-on-val choice, unless the way of choosing changed."""
        state, cfg = self.state, self.cfg
        metric = cfg.eval.select_metric if cfg.data.val else ""
        if state.best_tag and state.best_metric != metric:
            log.warning(
                "the run chose %s by %r; now %s: that choice is dropped",
                state.best_tag,
                state.best_metric or "nothing",
                f"data.val chooses by {metric}" if metric else "nothing is chosen (no data.val)",
            )
            state.best_score, state.best_tag, state.best_summary = float("-inf"), "", {}

    def _on_preempt(self, signum: int, _frame: object) -> None:
        """SIGTERM/SIGUSR1: finish the current step, then checkpoint and exit EXIT_REQUEUE."""
        log.warning("received %s: stopping after the current step", signal.Signals(signum).name)
        self.stop_requested = True

    # ------------------------------------------------------------------ the loop

    def train(self) -> int:
        """Run to the end (0) or to a preemption checkpoint (EXIT_REQUEUE)."""
        state, cfg = self.state, self.cfg
        log.info(
            "training %d epochs x %d steps (total %d) on %d rank(s), %s",
            cfg.run.epochs,
            self.steps_per_epoch,
            self.total_steps,
            self.env.world_size,
            f"resumed from {self.resumed_from}" if self.resumed_from else "fresh start",
        )
        self._heal_epoch_export()
        self.reporter.start(state.global_step)
        while state.epoch <= cfg.run.epochs and state.global_step < self.total_steps:
            end = self._train_epoch()
            if end is EpochEnd.PREEMPTED:
                self._save(step_tag(state.global_step))
                return EXIT_REQUEUE
            if end is EpochEnd.DONE:
                self._end_epoch()
                if self._agree_stop():
                    return EXIT_REQUEUE
        self._finish()
        return 0

    def _train_epoch(self) -> EpochEnd:
        """Train until the epoch ends, run.max_steps is reached or every rank agrees to stop."""
        state = self.state
        limit = self.steps_per_epoch * self.plan.grad_accum
        self.engine.train()
        batches = self.train_loader.epoch_batches(state.epoch, start_step=state.batch_in_epoch)
        meter = StepMeter(start=time.perf_counter())
        stop_agreed = False
        t_ready = time.perf_counter()
        for batch in batches:
            if state.batch_in_epoch >= limit:
                break
            data_wait = time.perf_counter() - t_ready
            if meter.micro == 0:
                meter.lr = engine.current_lr(self.engine)  # the lr this optimizer step uses
            agreed = self._micro_step(batch)
            state.batch_in_epoch += 1
            if agreed is not None:
                stop_agreed |= agreed.stop
                meter.add(agreed.mean_losses(self.env.world_size), data_wait, self.teaching.last_ms)
            if self.engine.global_steps != state.global_step:  # an optimizer step happened
                state.global_step = self.engine.global_steps
                self._after_step(meter)
                meter = StepMeter(start=time.perf_counter())
                if stop_agreed:
                    return EpochEnd.PREEMPTED
                if state.batch_in_epoch >= limit:
                    return EpochEnd.DONE
                if state.global_step >= self.total_steps:
                    return EpochEnd.MAX_STEPS
            t_ready = time.perf_counter()
        return EpochEnd.DONE

    def _micro_step(self, batch: Batch) -> Agreement | None:
        """Forward (teacher, student), agree across ranks, backward+step; None when skipped."""
        fbank = batch.fbank.to(self.device, non_blocking=True)
        labels = batch.labels.to(self.device, non_blocking=True)
        teacher_logits = self.teaching.logits(batch, fbank)
        logits = self.engine(fbank.to(self.dtype)).float()
        parts = self.loss_fn(logits, labels, teacher_logits)
        kd = parts.kd.detach() if parts.kd is not None else torch.zeros((), device=self.device)
        finite = torch.isfinite(parts.total.detach())
        # The one collective per micro-batch (also a CPU-GPU sync point): losses for logging,
        # the non-finite flag and the preemption flag, so every rank decides the same thing.
        summed = Agreement.pack(
            loss=parts.total.detach(),
            label_loss=parts.label.detach(),
            kd_loss=kd,
            nonfinite=~finite,
            stopping=self.stop_requested,
            device=self.device,
        )
        agreed = Agreement.unpack(dist.all_reduce_sum(summed))
        if self.samples_log is not None:  # run.record_samples: what each batch held
            at = {"epoch": self.state.epoch, "batch": self.state.batch_in_epoch}
            self.samples_log.write({**at, "keys": list(batch.keys),
                                    "loss": float(parts.total.detach())})  # fmt: skip
        if agreed.nonfinite:
            handle_nonfinite(
                self.cfg, self.state, list(batch.keys), finite_here=bool(finite), ckpt=self.ckpt
            )
            self.tracker.log_metrics(
                {"nonfinite_skips": self.state.nonfinite_skips}, self.state.global_step
            )
            return None
        self.engine.backward(parts.total)
        norm = engine.step(self.engine)
        if norm is not None:
            self._grad_norm = norm
        return agreed

    def _after_step(self, meter: StepMeter) -> None:
        """Per-step metrics, periodic evaluation and checkpoints."""
        state, cfg = self.state, self.cfg
        step = state.global_step
        if step % cfg.run.log_every_steps == 0 or step == 1 or step == self.total_steps:
            grad_norm = engine.global_grad_norm(self.engine, self._grad_norm)
            self.reporter.report(meter, step=step, epoch=state.epoch, grad_norm=grad_norm)
        if cfg.run.eval_every_steps and step % cfg.run.eval_every_steps == 0:
            name = step_tag(step)
            if self._evaluate(name):
                self._save(name)
                self.export(name, "best.pt")
        if cfg.run.checkpoint_every_steps and step % cfg.run.checkpoint_every_steps == 0:
            self._save(step_tag(step))

    # ------------------------------------------------------------------ eval / save

    def _evaluate(self, name: str) -> bool:
        """Evaluate the student (the teacher beside it); True when it is a new best on val.

        Without data.val the evaluation is on the eval set, for monitoring: it chooses nothing.
        """
        state, cfg = self.state, self.cfg
        summary = self.evaluator.student(
            self.engine, self.dtype, name, step=state.global_step, epoch=state.epoch
        )
        if self.teaching.online is not None and cfg.eval.teacher:
            self.evaluator.teacher(self.teaching.online, step=state.global_step, epoch=state.epoch)
        if not cfg.data.val:
            return False
        metric = cfg.eval.select_metric
        improved = summary[metric] > state.best_score
        if improved:
            state.best_score, state.best_metric, state.best_tag = summary[metric], metric, name
            state.best_epoch, state.best_step = state.epoch, state.global_step
            state.best_summary = dict(summary)
            log.info("best on val so far by %s: %s (%.4f)", metric, name, summary[metric])
        return improved

    def _save(self, tag: str) -> None:
        """Checkpoint ``tag`` on every rank (skipped when this step is already saved)."""
        if self._last_saved_step == self.state.global_step and tag.startswith("step-"):
            return
        self.state.loader = self.train_loader.state_dict()
        self.state.rng = capture_rng()
        self.ckpt.save(self.engine, tag, self.state)
        self._last_saved_step = self.state.global_step

    def export(self, tag: str, filename: str) -> Path:
        """Rank 0 writes ``models/<filename>`` from checkpoint ``tag``; all ranks wait."""
        dest = self.ckpt.models_dir / filename
        failed: str | None = None
        if self.is_main:
            try:
                self.ckpt.export(
                    tag,
                    dest,
                    cfg=self.cfg,
                    num_classes=self.num_classes,
                    class_names=self.class_names,
                )
            except StorageError as exc:  # a full disk: every rank stops with rank 0's words
                failed = str(exc)
        failed = dist.broadcast_object(failed)  # type: ignore[assignment]
        if failed:
            raise StorageError(failed, path=dest, needed=None, free=None)
        return dest

    def _end_epoch(self) -> None:
        """Evaluate, checkpoint the epoch, export its student (and best.pt when improved)."""
        state = self.state
        tag = epoch_tag(state.epoch)
        improved = self._evaluate(tag)
        state.epoch += 1
        state.batch_in_epoch = 0
        self._save(tag)
        exported = self.export(tag, f"{tag}.pt")
        if improved and self.is_main:
            copy_export(exported, self.ckpt.models_dir / "best.pt")
        dist.barrier()

    def _heal_epoch_export(self) -> None:
        """After a crash between an epoch checkpoint and its export, redo the export."""
        tag = self.resumed_from
        if tag and tag.startswith("epoch-") and not (self.ckpt.models_dir / f"{tag}.pt").is_file():
            log.warning("export of %s missing: exporting it now", tag)
            self.export(tag, f"{tag}.pt")

    def _agree_stop(self) -> bool:
        flag = torch.tensor([float(self.stop_requested)], device=self.device)
        return bool(dist.all_reduce_sum(flag).item() > 0)

    def _finish(self) -> None:
        """End of training: evaluate/save a mid-epoch end, export final.pt, then the report."""
        state = self.state
        if state.batch_in_epoch > 0:  # stopped by max_steps inside an epoch
            tag = step_tag(state.global_step)
            improved = self._evaluate(tag)
            self._save(tag)
            if improved:
                self.export(tag, "best.pt")
        tag = self.ckpt.latest_tag()
        assert tag is not None
        final = self.export(tag, "final.pt")
        choice = run_end.choose(self, final)
        self.report = run_end.write_report(self, choice)
        if self.is_main:
            self.tracker.log_checkpoint(choice.export)
            self.tracker.log_model(choice.export, register=self.cfg.tracking.register)
        log.info(
            "training done: step %d; reported %s (%s): eval mAP %.4f acc %.4f",
            state.global_step,
            choice.model,
            self.report["checkpoint"],
            self.report["mAP"],
            self.report["acc"],
        )

    def close(self, status: str, note: str = "") -> None:
        """Finish the tracker run, release the DALI pipelines and the process group."""
        self.tracker.finish(status, note)
        self.loaders.close()
        dist.destroy()

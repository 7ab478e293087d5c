"""End-to-end trainer runs on CPU: real prep shards, the DALI loader, real models, DeepSpeed
over gloo with 2 ranks, a real EfficientNet teacher trained by the same trainer beforehand.

Runs are shared between assertions through module-scoped fixtures; each one is a subprocess
launched as in production (``torch.distributed.run``, or one process per rank with SLURM's
variables as ``srun`` sets them).
"""

from __future__ import annotations

import csv
import json
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from cmkd_scale.dist import EXIT_REQUEUE
from tests.fixtures.train import (  # the `data` fixture comes from there, via conftest.py
    CONFIG,
    EVAL_CLIPS,
    NUM_CLASSES,
    free_port,
    jsonl,
    run_cmd,
    shard_labels,
    srun_like,
    step_losses,
    torchrun,
    train_args,
    train_cnn_teacher,
    wait_all,
)

pytestmark = pytest.mark.slow


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def teacher_run(data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An EfficientNet-B0 trained WITHOUT a teacher, in ONE process (no launcher env)."""
    return train_cnn_teacher(tmp_path_factory.mktemp("teacher") / "run", data, steps=6)


@pytest.fixture(scope="module")
def zero3_run(data: dict[str, Path], teacher_run: Path, tmp_path_factory) -> Path:
    """2 ranks, ZeRO-3, EfficientNet teacher -> tiny AST student, 2 epochs of 4 steps."""
    run_dir = tmp_path_factory.mktemp("zero3") / "run"
    torchrun(
        run_dir,
        data,
        "deepspeed.zero_stage=3",
        f"teacher.checkpoint={teacher_run / 'models' / 'final.pt'}",
        "run.epochs=2",
        "optim.lr=3e-3",
        "optim.warmup_steps=2",
    )
    return run_dir


ZERO2 = ("deepspeed.zero_stage=2", "run.record_samples=true", "run.max_steps=7")


@pytest.fixture(scope="module")
def zero2_reference(data: dict[str, Path], teacher_run: Path, tmp_path_factory) -> Path:
    """2 ranks, ZeRO-2, uninterrupted: the reference for the resume test."""
    run_dir = tmp_path_factory.mktemp("zero2_ref") / "run"
    torchrun(run_dir, data, *ZERO2, f"teacher.checkpoint={teacher_run / 'models/final.pt'}")
    return run_dir


@pytest.fixture(scope="module")
def zero2_preempted(data: dict[str, Path], teacher_run: Path, tmp_path_factory) -> dict:
    """The same run, SIGUSR1 to rank 1 only mid-run (exit 85 on both), then resumed."""
    run_dir = tmp_path_factory.mktemp("zero2_pre") / "run"
    args = (*ZERO2, f"teacher.checkpoint={teacher_run / 'models/final.pt'}")
    procs = srun_like(run_dir, data, *args)
    samples = run_dir / "samples" / "rank1.jsonl"
    deadline = time.monotonic() + 300
    while not (samples.is_file() and len(samples.read_text().splitlines()) >= 3):
        assert all(p.poll() is None for p in procs), "a rank exited before the signal"
        assert time.monotonic() < deadline, "the run never reached step 3"
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGUSR1)
    first_codes = wait_all(procs)
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    stopped_at = step_losses(run_dir)
    second_codes = wait_all(srun_like(run_dir, data, *args))
    return {
        "run_dir": run_dir,
        "first_codes": first_codes,
        "second_codes": second_codes,
        "latest_after_signal": latest,
        "steps_before_resume": max(stopped_at),
    }


# ------------------------------------------------------------------------------- tests


def test_plain_training_without_teacher_in_one_process(teacher_run: Path) -> None:
    losses = step_losses(teacher_run)
    assert sorted(losses) == list(range(1, 7))
    assert np.mean([losses[s] for s in (5, 6)]) < np.mean([losses[s] for s in (1, 2)])
    records = [r for r in jsonl(teacher_run / "metrics.jsonl") if "loss" in r]
    assert all(r["kd_loss"] == 0.0 and r["teacher_ms"] == 0.0 for r in records)
    export = torch.load(teacher_run / "models" / "final.pt", weights_only=False)
    assert export["config"]["model"]["name"] == "efficientnet_b0"
    assert export["num_classes"] == NUM_CLASSES and len(export["class_names"]) == NUM_CLASSES
    assert json.loads((teacher_run / "deepspeed.json").read_text())["train_batch_size"] == 4


def test_zero3_distillation_learns(zero3_run: Path) -> None:
    records = [r for r in jsonl(zero3_run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 9))
    first = np.mean([r["loss"] for r in records[:3]])
    last = np.mean([r["loss"] for r in records[-3:]])
    assert last < first, (first, last)
    assert all(r["kd_loss"] > 0 and r["teacher_ms"] > 0 for r in records)  # the teacher is used
    assert all(np.isfinite(r["grad_norm"]) and r["clips_per_s"] > 0 for r in records)
    lrs = [r["lr"] for r in records]
    # 2 warm-up steps, then 3e-3 to the end of epoch 1, halved for epoch 2 (AST step decay)
    assert lrs == pytest.approx([1.5e-3, 3e-3, 3e-3, 3e-3] + [1.5e-3] * 4)
    ds = json.loads((zero3_run / "deepspeed.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3 and ds["train_batch_size"] == 8
    for name in ("epoch-001.pt", "epoch-002.pt", "wa.pt", "final.pt"):
        assert (zero3_run / "models" / name).is_file(), name


def test_without_val_nothing_is_chosen_and_the_weight_average_is_reported(zero3_run: Path) -> None:
    """No data.val: the epoch evaluations on eval are monitoring curves, no best.pt; the
    recipe's wa range (debug_cpu: epochs 1..2) makes models/wa.pt the reported model."""
    assert not (zero3_run / "models" / "best.pt").exists()
    records = [r for r in jsonl(zero3_run / "metrics.jsonl") if "eval" in r]
    assert [(r["eval"], r["split"]) for r in records] == [
        ("epoch-001", "eval"),
        ("epoch-002", "eval"),
        ("report", "eval"),
    ]
    report = json.loads((zero3_run / "eval" / "report_summary.json").read_text())
    assert report == {
        "model": "wa",
        "checkpoint": "models/wa.pt",
        "selected_on": None,
        "select_metric": None,
        "epoch": None,
        "step": 8,
        **{k: pytest.approx(records[-1][k]) for k in ("mAP", "mAUC", "dprime", "acc")},
        "val": None,
    }
    for suffix in ("_class_ap.csv", "_predictions.npz"):
        assert (zero3_run / "eval" / f"report{suffix}").is_file()


def test_a_run_ended_before_its_wa_range_reports_the_final_model(teacher_run: Path) -> None:
    """max_steps=6 ends inside epoch 1 of debug_cpu's wa range 1..2: the final model, whose
    evaluation at step 6 is the report (scored once)."""
    assert not (teacher_run / "models" / "best.pt").exists()
    assert not (teacher_run / "models" / "wa.pt").exists()
    report = json.loads((teacher_run / "eval" / "report_summary.json").read_text())
    assert (report["model"], report["checkpoint"]) == ("final", "models/final.pt")
    assert (report["epoch"], report["step"], report["selected_on"]) == (1, 6, None)
    step6 = json.loads((teacher_run / "eval" / "step-000006_summary.json").read_text())
    assert {k: report[k] for k in step6} == step6


def test_eval_gathers_every_clip_once_and_matches_sklearn(
    zero3_run: Path, data: dict[str, Path]
) -> None:
    pred = np.load(zero3_run / "eval" / "epoch-002_predictions.npz")
    probs, targets = pred["probs"], pred["targets"]
    assert probs.shape == (EVAL_CLIPS, NUM_CLASSES)
    # rows are in global sample order: exactly the eval shards' labels, none lost or doubled
    np.testing.assert_array_equal(targets, shard_labels(data["eval"]))
    with open(zero3_run / "eval" / "epoch-002_class_ap.csv") as fh:
        rows = list(csv.DictReader(fh))
    names = json.loads((data["eval"] / "manifest.json").read_text())["classes"]
    assert [r["display_name"] for r in rows] == [c["display_name"] for c in names]
    aps = []
    for c, row in enumerate(rows):
        if 0 < targets[:, c].sum() < len(targets):
            ap = average_precision_score(targets[:, c], probs[:, c])
            auc = roc_auc_score(targets[:, c], probs[:, c])
            assert float(row["AP"]) == pytest.approx(ap, abs=1e-6)
            assert float(row["AUC"]) == pytest.approx(auc, abs=1e-6)
            aps.append(ap)
    assert aps, "the eval set should have classes with positives and negatives"
    summary = json.loads((zero3_run / "eval" / "epoch-002_summary.json").read_text())
    assert summary["mAP"] == pytest.approx(np.mean(aps), abs=1e-6)


def test_zero3_export_reproduces_the_trainer_eval(zero3_run: Path, data: dict[str, Path]) -> None:
    """The consolidated fp32 export of a ZeRO-3 run loads strictly and predicts the same."""
    from cmkd_scale.data import EvalLoader
    from cmkd_scale.evaluate.scoring import predict_local
    from cmkd_scale.models.exported import Export

    export = Export.load(zero3_run / "models" / "final.pt")
    assert export.source_checkpoint == "epoch-002"
    model = export.model("cpu")
    cfg = export.cfg
    loader = EvalLoader(cfg.data, micro_batch=4, rank=0, world_size=1, device="cpu")
    try:
        index, probs, _ = predict_local(
            lambda x: torch.sigmoid(model(x)), loader, device=torch.device("cpu")
        )
    finally:
        loader.close()
    expected = np.load(zero3_run / "eval" / "epoch-002_predictions.npz")["probs"]
    np.testing.assert_allclose(probs[np.argsort(index)], expected, atol=1e-5)


def test_weight_averaging_and_ensemble_commands(zero3_run: Path) -> None:
    from cmkd_scale.models.exported import Export

    models = zero3_run / "models"
    wa = run_cmd([sys.executable, "-m", "cmkd_scale.evaluate", "--wa", str(zero3_run)])
    assert wa.returncode == 0, wa.stderr[-4000:]
    averaged = Export.load(models / "wa-001-002.pt").state_dict
    e1, e2 = (Export.load(models / f"epoch-00{e}.pt").state_dict for e in (1, 2))
    for key, value in averaged.items():
        torch.testing.assert_close(value, (e1[key] + e2[key]) / 2)
    assert json.loads(wa.stdout.strip().splitlines()[-1])["name"] == "wa-001-002"
    assert (zero3_run / "eval" / "wa-001-002_class_ap.csv").is_file()
    # the trainer's own weight average (its report) is the command's
    trainer_wa = Export.load(models / "wa.pt").state_dict
    for key, value in averaged.items():
        torch.testing.assert_close(trainer_wa[key], value, rtol=0, atol=0)
    by_command = json.loads((zero3_run / "eval" / "wa-001-002_summary.json").read_text())
    report = json.loads((zero3_run / "eval" / "report_summary.json").read_text())
    for key in ("mAP", "mAUC", "acc"):
        assert report[key] == pytest.approx(by_command[key], abs=1e-6)

    cmd = [sys.executable, "-m", "cmkd_scale.evaluate"]
    cmd += [
        "--checkpoint",
        str(models / "epoch-001.pt"),
        "--checkpoint",
        str(models / "epoch-002.pt"),
    ]
    ens = run_cmd(cmd)
    assert ens.returncode == 0, ens.stderr[-4000:]
    got = np.load(zero3_run / "eval" / "ensemble_predictions.npz")["probs"]
    per_epoch = [
        np.load(zero3_run / "eval" / f"epoch-00{e}_predictions.npz")["probs"] for e in (1, 2)
    ]
    np.testing.assert_allclose(got, np.mean(per_epoch, axis=0), atol=1e-5)


def test_sigusr1_checkpoints_and_exits_for_requeue(zero2_preempted: dict) -> None:
    assert zero2_preempted["first_codes"] == [EXIT_REQUEUE, EXIT_REQUEUE]
    stopped = zero2_preempted["steps_before_resume"]
    assert 3 <= stopped < 7, "the signal should stop the run mid-way"
    # the checkpoint holds every step taken: a step checkpoint, or, when the stop is agreed
    # after the epoch-end work at the boundary (4 steps/epoch on 2 ranks), the epoch one
    expected = {f"step-{stopped:06d}"} | ({"epoch-001"} if stopped == 4 else set())
    assert zero2_preempted["latest_after_signal"] in expected
    assert zero2_preempted["second_codes"] == [0, 0]


def test_resume_sees_the_same_samples_and_losses(
    zero2_preempted: dict, zero2_reference: Path
) -> None:
    resumed = zero2_preempted["run_dir"]
    ref_losses, got_losses = step_losses(zero2_reference), step_losses(resumed)
    assert sorted(got_losses) == sorted(ref_losses) == list(range(1, 8))
    for step, loss in ref_losses.items():
        assert got_losses[step] == pytest.approx(loss, rel=1e-6, abs=1e-7), step
    for rank in range(2):
        ref = jsonl(zero2_reference / "samples" / f"rank{rank}.jsonl")
        got = jsonl(resumed / "samples" / f"rank{rank}.jsonl")
        assert [(r["epoch"], r["batch"], r["keys"]) for r in got] == [
            (r["epoch"], r["batch"], r["keys"]) for r in ref
        ]
        np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in ref], rtol=1e-6)
    # max_steps=7 stopped inside epoch 2: evaluated, checkpointed and exported there
    assert (resumed / "checkpoints" / "latest").read_text() == "step-000007"
    assert (resumed / "models" / "final.pt").is_file()


@pytest.fixture()
def in_process_rank(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This pytest process as a 1-rank job; env, signal handlers and threads restored after."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


def test_teacher_gets_no_gradients_and_stays_unchanged_in_the_trainer(
    data: dict[str, Path], teacher_run: Path, tmp_path: Path, in_process_rank: None
) -> None:
    from cmkd_scale.config import load_config
    from cmkd_scale.train.trainer import Trainer

    overrides = train_args(tmp_path / "run", data, "run.max_steps=3")[4:]
    overrides.append(f"teacher.checkpoint={teacher_run / 'models/final.pt'}")
    trainer = Trainer(load_config(CONFIG, overrides))
    teacher = trainer.teaching.online
    assert teacher is not None
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    try:
        assert trainer.train() == 0
    finally:
        trainer.close("FINISHED")
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    for key, value in teacher.state_dict().items():  # weights and BatchNorm statistics
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert trainer.state.global_step == 3


def test_nonfinite_loss_stops_naming_step_and_clips(data: dict[str, Path], tmp_path: Path) -> None:
    """A real divergence (lr 1e30): stop with the step and the batch's keys."""
    args = train_args(
        tmp_path / "run",
        data,
        "teacher=none",
        "optim.lr=1e30",
        "optim.warmup_steps=0",
        "optim.grad_clip=0.0",
    )
    proc = run_cmd([sys.executable, *args])
    assert proc.returncode != 0
    assert "NonFiniteLossError: non-finite loss at optimizer step" in proc.stderr
    assert "clips by rank: {0: ['" in proc.stderr and "run.nonfinite_loss=skip" in proc.stderr

    skip = run_cmd([sys.executable, *args, "run.nonfinite_loss=skip", "run.max_nonfinite_skips=2"])
    assert skip.returncode != 0
    assert skip.stderr.count("skipped non-finite loss") == 2
    assert "run.max_nonfinite_skips=2 is spent" in skip.stderr


@pytest.mark.gpu
def test_one_gpu_bf16_run_with_bf16_teacher(
    data: dict[str, Path], teacher_run: Path, tmp_path: Path
) -> None:
    """On a GPU: precision/teacher dtype auto -> bf16, DALI on the GPU, peak memory logged."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    run_dir = tmp_path / "run"
    args = train_args(
        run_dir,
        data,
        "data.device=auto",
        "run.max_steps=4",
        f"teacher.checkpoint={teacher_run / 'models/final.pt'}",
    )
    proc = run_cmd([sys.executable, *args])
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert json.loads((run_dir / "deepspeed.json").read_text())["bf16"]["enabled"]
    records = [r for r in jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert all(r["peak_mem_gb"] > 0 and np.isfinite(r["loss"]) for r in records)
    assert "torch.bfloat16, frozen" in proc.stderr  # the teacher in its own dtype

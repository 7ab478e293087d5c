"""Gradient accumulation and step evaluations, end to end: 2 ranks of the real trainer
(DeepSpeed ZeRO-2 over gloo), the DALI CPU loader on real prep shards, a tiny AST student.

- grad_accum=2 against grad_accum=1 with twice the micro batch: the same optimizer steps,
  learning rates and clips per step, and the same student after each step.
- without ZeRO (stage 0, fp32) the reported gradient norm is the one ZeRO-2 reports.
- run.eval_every_steps on a val set with a preemption between two step evaluations: every
  evaluation once, best.pt following the best one on val across the resume, the eval set
  absent until the resume and then read once, for best.pt's report.

Launchers, the `data` shard fixture and the small readers come from tests/fixtures/train.py.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cmkd_scale.config import ConfigError, load_config
from cmkd_scale.dist import EXIT_REQUEUE
from tests.fixtures.train import jsonl, run_cmd, srun_like, torchrun, wait_all

WORLD = 2
STEPS_PER_EPOCH = 4  # optimizer steps: 32 clips / (2 ranks x 4 clips per optimizer step)
ACCUM = ("deepspeed.micro_batch=2", "deepspeed.grad_accum=2")
ONE_BIG_BATCH = ("deepspeed.micro_batch=4", "deepspeed.grad_accum=1")
# Adam's first update is lr * g / (|g| + eps) ~ lr * sign(g): blind to how the gradient is
# scaled (a grad_accum that forgot to divide by 2 would pass). With eps = 1 >> |g| the update
# is ~ lr * g, so the parameters show the gradient's size as well as its direction. Clipping
# would rescale a wrongly scaled gradient back to the clip norm: the clip norm is set out of
# reach (grad_clip=0 omits DeepSpeed's key, whose own default then clips at 1.0). The
# student is an AST (LayerNorm, no batch-norm, dropout 0): the loss is a mean over clips that
# does not depend on how the clips are grouped into micro-batches; SpecAugment draws are keyed
# by a clip's position in the epoch, so both runs augment every clip alike. teacher=none: the
# teacher scores clip by clip in eval mode, so it would not change the comparison.
COMPARE = (
    "teacher=none",
    "run.epochs=2",
    "run.checkpoint_every_steps=1",
    "run.keep_checkpoints=100",
    "run.record_samples=true",
    "optim.lr=1e-2",
    "optim.eps=1.0",
    "optim.grad_clip=1e9",
    "optim.warmup_steps=2",
)


def _steps(run_dir: Path) -> list[dict]:
    return [r for r in jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def _keys_per_step(run_dir: Path, micro_per_step: int) -> dict[int, list[str]]:
    """The clips each optimizer step consumed over all ranks, from the samples logs."""
    steps: dict[int, list[str]] = {}
    for rank in range(WORLD):
        for r in jsonl(run_dir / "samples" / f"rank{rank}.jsonl"):
            step = (r["epoch"] - 1) * STEPS_PER_EPOCH + r["batch"] // micro_per_step + 1
            steps.setdefault(step, []).extend(r["keys"])
    return {step: sorted(keys) for step, keys in sorted(steps.items())}


def _student(run_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    from cmkd_scale.train.engine import consolidated_fp32_state_dict, ds_env_defaults

    ds_env_defaults()
    return consolidated_fp32_state_dict(run_dir / "checkpoints", tag, zero_stage=2)


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return float(sum(((a[k] - b[k]).detach().double() ** 2).sum() for k in a).sqrt())


@pytest.fixture(scope="module")
def accum_runs(data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The same 2 epochs twice: micro batch 2 x grad_accum 2, and micro batch 4 x 1."""
    runs = {}
    for name, split in (("accum", ACCUM), ("big_batch", ONE_BIG_BATCH)):
        run_dir = tmp_path_factory.mktemp(name) / "run"
        torchrun(run_dir, data, *COMPARE, *split)
        runs[name] = run_dir
    return runs


@pytest.mark.slow
def test_grad_accum_counts_optimizer_steps_and_their_samples(accum_runs: dict) -> None:
    accum, big = accum_runs["accum"], accum_runs["big_batch"]
    ds = json.loads((accum / "deepspeed.json").read_text())
    assert ds["gradient_accumulation_steps"] == 2 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["train_batch_size"] == 2 * 2 * WORLD
    records = _steps(accum)
    # steps_per_epoch counts optimizer steps (4), not micro-batches (8 per rank and epoch)
    assert [r["step"] for r in records] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    assert [r["epoch"] for r in records] == [1] * 4 + [2] * 4
    # the schedule advances once per optimizer step: 2 warm-up steps, then 1e-2 to the end of
    # epoch 1, halved for epoch 2 (per micro-batch, warm-up would end after the first step)
    expected_lr = [5e-3, 1e-2, 1e-2, 1e-2] + [5e-3] * 4
    assert [r["lr"] for r in records] == pytest.approx(expected_lr)
    assert [r["lr"] for r in _steps(big)] == pytest.approx(expected_lr)

    per_rank = [jsonl(accum / "samples" / f"rank{rank}.jsonl") for rank in range(WORLD)]
    assert [len(micro) for micro in per_rank] == [2 * 2 * STEPS_PER_EPOCH] * WORLD
    assert all(len(r["keys"]) == 2 for micro in per_rank for r in micro)
    consumed = _keys_per_step(accum, micro_per_step=2)
    assert list(consumed) == list(range(1, 9))
    for step, keys in consumed.items():
        assert len(keys) == len(set(keys)) == 2 * 2 * WORLD, step  # micro x accum x world
    for epoch in (0, 1):  # every training clip once per epoch
        seen = [k for s in range(1, 5) for k in consumed[4 * epoch + s]]
        assert len(set(seen)) == 32
    # the very clips the one-big-batch run used for each optimizer step
    assert consumed == _keys_per_step(big, micro_per_step=1)


@pytest.mark.slow
def test_without_zero_the_gradient_norm_is_the_one_zero_reports(
    accum_runs: dict, data: dict[str, Path], tmp_path: Path
) -> None:
    """ZeRO stage 0 in fp32: DeepSpeed clips with a norm it discards; ours is reported."""
    run_dir = tmp_path / "run"
    torchrun(run_dir, data, *COMPARE, *ONE_BIG_BATCH, "deepspeed.zero_stage=0")
    zero0, zero2 = _steps(run_dir), _steps(accum_runs["big_batch"])
    assert len(zero0) == 2 * STEPS_PER_EPOCH
    for a, b in zip(zero0, zero2, strict=True):
        assert np.isfinite(a["grad_norm"]) and a["grad_norm"] > 0, a
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3), a["step"]


@pytest.mark.slow
def test_grad_accum_update_equals_the_one_of_twice_the_micro_batch(accum_runs: dict) -> None:
    accum, big = accum_runs["accum"], accum_runs["big_batch"]
    one_update = _distance(_student(accum, "step-000002"), _student(accum, "step-000001"))
    assert one_update > 0
    for step in (1, 2, 5, 8):
        tag = f"step-{step:06d}"
        gap = _distance(_student(accum, tag), _student(big, tag))
        # float32 sums in another order drift apart by ~1e-7 (~1e-5 of an update); a gradient
        # summed over the micro-batches instead of averaged puts them ~0.5 update apart after
        # step 1 (seen by doubling the loss when grad_accum > 1)
        assert gap < 1e-3 * one_update, (tag, gap, one_update)
    # the step's loss is the mean over its clips, its gradient norm that of the whole step
    for a, b in zip(_steps(accum), _steps(big), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), a["step"]


@pytest.mark.slow
def test_folds_command_on_two_real_runs(accum_runs: dict, tmp_path: Path) -> None:
    """``evaluate folds`` on real runs' records (both runs as two "folds": no val, so their
    per-epoch evaluations are on the eval set, monitoring only)."""
    runs = [accum_runs["accum"], accum_runs["big_batch"]]
    cmd = [sys.executable, "-m", "cmkd_scale.evaluate", "folds", *map(str, runs)]
    cmd += ["--metric", "mAP", "--out", str(tmp_path)]
    proc = run_cmd(cmd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "folds_summary.json").read_text())
    per_run = [
        [json.loads((r / "eval" / f"epoch-00{e}_summary.json").read_text())["mAP"] for e in (1, 2)]
        for r in runs
    ]
    means = np.mean(per_run, axis=0)
    best = int(np.argmax(means)) + 1
    assert summary["best"]["epoch"] == best and summary["last"]["epoch"] == 2
    assert summary["best"]["mean"] == pytest.approx(means[best - 1])
    assert summary["last"]["std"] == pytest.approx(np.std([r[1] for r in per_run], ddof=1))
    assert f"best epoch {best}: mAP {means[best - 1]:.4f}" in proc.stdout


def test_skipping_nonfinite_batches_is_refused_with_grad_accum() -> None:
    """A skipped micro-batch would shift every later accumulation boundary: refused up front."""
    from cmkd_scale.train.trainer import Trainer

    cfg = load_config(None, ["run.nonfinite_loss=skip", "deepspeed.grad_accum=2"])
    with pytest.raises(ConfigError, match=r"run\.nonfinite_loss=stop, or deepspeed\.grad_accum=1"):
        Trainer(cfg)


# ------------------------------------------------------------------------ step evaluations

STEP_EVAL = (
    *ACCUM,
    "run.epochs=3",
    "run.eval_every_steps=6",  # optimizer steps: evaluations at 6 and 12 (= end of epoch 3)
    "run.checkpoint_every_steps=0",
    "run.record_samples=true",
    "optim.lr=3e-3",
    "optim.warmup_steps=2",
    # a random teacher: its evaluation is logged beside the student's, and its forward makes
    # a step slow enough (~0.5 s) for the signal below to land between two evaluations
    "teacher.arch=efficientnet",
    "teacher.name=random:efficientnet_b0",
    "teacher.checkpoint=",
)
# (step, tag) of every evaluation of the run, in order: epoch ends at 4, 8, 12
EVALUATIONS = [
    (4, "epoch-001"),
    (6, "step-000006"),
    (8, "epoch-002"),
    (12, "step-000012"),
    (12, "epoch-003"),
]


def _evals(run_dir: Path) -> list[tuple[int, str, float]]:
    """The evaluations during training (on data.val), in order."""
    records = jsonl(run_dir / "metrics.jsonl")
    return [(r["step"], r["eval"], r["mAP"]) for r in records if r.get("split") == "val"]


def _best_so_far(evals: list[tuple[int, str, float]]) -> str:
    """The tag the trainer must call best: the first to reach the highest mAP."""
    best, tag = -1.0, ""
    for _, name, m_ap in evals:
        if m_ap > best:
            best, tag = m_ap, name
    return tag


def _source(export: Path) -> str:
    return torch.load(export, map_location="cpu", weights_only=False)["source_checkpoint"]


@pytest.fixture(scope="module")
def step_eval_run(data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """SIGUSR1 to rank 1 after step 6's evaluation (stops at 7 or 8), then the resumed run.

    The evaluations choose on a val set (the eval shards under another name); data.eval names
    a folder that appears only after the first process stopped: training never reads it.
    """
    run_dir = tmp_path_factory.mktemp("step_eval") / "run"
    eval_later = run_dir.parent / "eval_later"
    args = (*STEP_EVAL, f"data.val={data['eval']}", f"data.eval={eval_later}")
    procs = srun_like(run_dir, data, *args)
    samples = run_dir / "samples" / "rank1.jsonl"
    deadline = time.monotonic() + 300
    # micro-batch 13 opens optimizer step 7: step 6 and its evaluation are done
    while not (samples.is_file() and len(samples.read_text().splitlines()) >= 13):
        assert all(p.poll() is None for p in procs), "a rank exited before the signal"
        assert time.monotonic() < deadline, "the run never reached step 7"
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGUSR1)
    first_codes = wait_all(procs)
    before = {
        "evals": _evals(run_dir),
        "stopped": max(r["step"] for r in _steps(run_dir)),
        "best": _source(run_dir / "models" / "best.pt"),
    }
    eval_later.symlink_to(data["eval"], target_is_directory=True)
    second_codes = wait_all(srun_like(run_dir, data, *args))
    return {"run_dir": run_dir, "codes": (first_codes, second_codes), "before": before}


@pytest.mark.slow
def test_step_evaluations_survive_a_stop_between_two_of_them(step_eval_run: dict) -> None:
    run_dir, before = step_eval_run["run_dir"], step_eval_run["before"]
    assert step_eval_run["codes"] == ([EXIT_REQUEUE] * WORLD, [0] * WORLD)
    assert 6 < before["stopped"] < 12, "the signal should land between the two step evaluations"
    done = [e[:2] for e in before["evals"]]  # the first run's: in order, each once
    assert done == EVALUATIONS[: len(done)]
    assert all(step <= before["stopped"] for step, _ in done)
    assert all(step >= before["stopped"] for step, _ in EVALUATIONS[len(done) :]), "one lost"
    # both runs together: every evaluation exactly once, none repeated by the resumed run
    assert [e[:2] for e in _evals(run_dir)] == EVALUATIONS
    steps = [r["step"] for r in _steps(run_dir)]
    assert steps == list(range(1, 13))
    names = {
        p.name.removesuffix("_summary.json") for p in (run_dir / "eval").glob("*_summary.json")
    }
    assert names == {f"val_{tag}" for _, tag in EVALUATIONS} | {"val_teacher", "report"}
    for _, tag in EVALUATIONS:
        for suffix in ("_class_ap.csv", "_predictions.npz"):
            assert (run_dir / "eval" / f"val_{tag}{suffix}").is_file(), tag + suffix
    # step 12's two names score the same weights: one pass over the val set, the same numbers
    by_tag = {
        tag: json.loads((run_dir / "eval" / f"val_{tag}_summary.json").read_text())
        for tag in ("step-000012", "epoch-003")
    }
    assert by_tag["step-000012"] == by_tag["epoch-003"]
    rank0_log = (run_dir.parent / "run-rank0.log").read_text()
    # 4 student evaluations on val (steps 4, 6, 8, 12) + the teacher once: the resumed
    # process reads the teacher's saved predictions instead of another pass; + the report
    assert rank0_log.count("eval forward:") == 4 + 1 + 1
    assert "saved by an earlier process of this run" in rank0_log
    # the first process trained without the eval set existing; the second read it at the end
    assert "does not exist (yet): it is read only for the report" in rank0_log
    assert rank0_log.count("report: reading the eval set now") == 1
    assert rank0_log.rindex("val epoch-003") < rank0_log.index("report: reading the eval set")


@pytest.mark.slow
def test_best_model_follows_the_best_step_evaluation(step_eval_run: dict) -> None:
    run_dir, before = step_eval_run["run_dir"], step_eval_run["before"]
    assert before["best"] == _best_so_far(before["evals"])  # as it stood when preempted
    best = _best_so_far(_evals(run_dir))
    assert _source(run_dir / "models" / "best.pt") == best
    assert (run_dir / "checkpoints" / best).is_dir(), "the best checkpoint must not be pruned"
    state = torch.load(
        run_dir / "checkpoints" / best / "trainer-rank0.pt", map_location="cpu", weights_only=False
    )
    assert state["best_tag"] == best and state["best_metric"] == "mAP"
    assert state["best_score"] == pytest.approx(max(m for _, _, m in _evals(run_dir)))
    # the report: best.pt, chosen on val, scored once on the eval set after training
    report = json.loads((run_dir / "eval" / "report_summary.json").read_text())
    chosen = json.loads((run_dir / "eval" / f"val_{best}_summary.json").read_text())
    assert (report["model"], report["checkpoint"]) == ("best", "models/best.pt")
    assert (report["selected_on"], report["select_metric"]) == ("val", "mAP")
    assert report["step"] == dict((t, s) for s, t in EVALUATIONS)[best]
    assert report["val"] == chosen
    kinds = [r.get("eval") for r in jsonl(run_dir / "metrics.jsonl") if "loss" not in r]
    assert kinds[-1] == "report" and kinds.count("report") == 1

"""Choose on validation, report on eval: 2 ranks of the real trainer (DeepSpeed ZeRO-2 over
gloo, the DALI CPU loader on real prep shards, a tiny AST student) with ``data.val`` set.

- every evaluation during training scores the val set; ``models/best.pt`` is the epoch export
  with the best val metric (here ``eval.select_metric=acc``);
- the eval set is opened once, after the last training step, for best.pt only, and written as
  ``eval/report_summary.json``; started again, the finished run does not score it again.

The no-val case (report = weight average / final, no best.pt) is checked on the runs of
test_run.py; a preemption between val evaluations in test_accum.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fixtures.train import NUM_CLASSES, jsonl, run_cmd, torchrun

VAL_CLIPS = 12
EPOCHS = 3
STEPS_PER_EPOCH = 4  # 32 clips / (2 ranks x micro batch 4)


@pytest.fixture(scope="module")
def val_shards(data: dict[str, Path]) -> Path:
    """A third split (another seed, the same class index) as the val set."""
    from cmkd_scale.demo.synth import make_synthetic_audioset
    from cmkd_scale.prep import run_prep

    root = data["train"].parent
    index = root / "class_labels_indices.csv"
    synth = make_synthetic_audioset(
        root / "raw_val",
        num_clips=VAL_CLIPS,
        num_classes_used=NUM_CLASSES,
        duration_s=1.5,
        seed=2,
        split="val",
        class_labels_csv=index,
    )
    run_prep([synth.segments_csv], index, synth.audio_dir, str(root / "val"), shard_size=16)
    return root / "val"


@pytest.fixture(scope="module")
def val_run(data: dict[str, Path], val_shards: Path, tmp_path_factory) -> dict:
    """3 epochs choosing on val by accuracy; then the finished run started once more."""
    run_dir = tmp_path_factory.mktemp("val_run") / "run"
    overrides = (
        "teacher=none",
        f"run.epochs={EPOCHS}",
        f"data.val={val_shards}",
        "eval.select_metric=acc",
        "optim.lr=3e-3",
        "optim.warmup_steps=2",
    )
    first = torchrun(run_dir, data, *overrides)
    report = (run_dir / "eval" / "report_summary.json").read_text()
    again = torchrun(run_dir, data, *overrides)
    return {"run_dir": run_dir, "first": first, "again": again, "report": report}


def _source(export: Path) -> str:
    return torch.load(export, map_location="cpu", weights_only=False)["source_checkpoint"]


@pytest.mark.slow
def test_training_evaluates_on_val_and_best_pt_is_the_best_val_epoch(val_run: dict) -> None:
    run_dir = val_run["run_dir"]
    records = jsonl(run_dir / "metrics.jsonl")
    evals = [r for r in records if "eval" in r and r["eval"] != "report"]
    assert [(r["eval"], r["split"]) for r in evals] == [
        (f"epoch-00{e}", "val") for e in range(1, EPOCHS + 1)
    ]
    # the first epoch reaching the best val accuracy is chosen
    accs = [r["acc"] for r in evals]
    chosen = evals[int(np.argmax(accs))]
    assert _source(run_dir / "models" / "best.pt") == chosen["eval"]
    best = torch.load(run_dir / "models" / "best.pt", weights_only=False)["model"]
    same_epoch = torch.load(run_dir / "models" / f"{chosen['eval']}.pt", weights_only=False)
    for key, value in best.items():
        torch.testing.assert_close(value, same_epoch["model"][key], rtol=0, atol=0)
    # val files are named as such; nothing per-epoch was written for the eval set
    summaries = (run_dir / "eval").glob("*_summary.json")
    names = {p.name.removesuffix("_summary.json") for p in summaries}
    assert names == {f"val_epoch-00{e}" for e in range(1, EPOCHS + 1)} | {"report"}
    assert not (run_dir / "models" / "wa.pt").exists()  # with a val set, best.pt is reported
    state = torch.load(
        run_dir / "checkpoints" / f"epoch-00{EPOCHS}" / "trainer-rank0.pt",
        map_location="cpu",
        weights_only=False,
    )
    assert state["best_tag"] == chosen["eval"] and state["best_metric"] == "acc"
    assert state["best_score"] == pytest.approx(max(accs))


@pytest.mark.slow
def test_eval_is_read_once_after_training_for_the_chosen_model(
    val_run: dict, val_shards: Path
) -> None:
    run_dir = val_run["run_dir"]
    records = jsonl(run_dir / "metrics.jsonl")
    kinds = ["step" if "loss" in r else r["eval"] for r in records]
    # the one eval-set record comes after the last training step and the last val evaluation
    assert kinds.count("report") == 1 and kinds[-1] == "report"
    last_step = max(i for i, k in enumerate(kinds) if k == "step")
    assert last_step < kinds.index("report")
    report_record = records[-1]
    assert report_record["split"] == "eval" and report_record["model"] == "best"
    # the eval loader is built only for the report: its log line follows the last val epoch
    log = val_run["first"].stderr
    opened = log.index("report: reading the eval set now")
    assert log.rindex(f"val epoch-00{EPOCHS}") < opened
    assert log.count("report: reading the eval set now") == 2  # once per rank, at the end
    # the student: 3 val passes + 1 report pass (no teacher)
    assert log.count("eval forward:") == 2 * (EPOCHS + 1)

    report = json.loads((run_dir / "eval" / "report_summary.json").read_text())
    evals = {r["eval"]: r for r in records if r.get("split") == "val"}
    chosen = _source(run_dir / "models" / "best.pt")
    assert report["model"] == "best" and report["checkpoint"] == "models/best.pt"
    assert report["selected_on"] == "val" and report["select_metric"] == "acc"
    assert report["epoch"] == int(chosen.split("-")[1])
    assert report["step"] == report["epoch"] * STEPS_PER_EPOCH
    assert report["val"] == {k: evals[chosen][k] for k in ("mAP", "mAUC", "dprime", "acc")}
    for key in ("mAP", "mAUC", "dprime", "acc"):
        assert report[key] == pytest.approx(report_record[key])
    assert report["val"] != {k: report[k] for k in ("mAP", "mAUC", "dprime", "acc")}
    for suffix in ("_class_ap.csv", "_predictions.npz"):
        assert (run_dir / "eval" / f"report{suffix}").is_file()


@pytest.mark.slow
def test_report_matches_the_evaluate_command_on_best_pt(val_run: dict, data: dict) -> None:
    run_dir = val_run["run_dir"]
    cmd = [sys.executable, "-m", "cmkd_scale.evaluate", "--checkpoint"]
    cmd += [str(run_dir / "models" / "best.pt"), f"data.eval={data['eval']}"]
    proc = run_cmd(cmd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    report = json.loads((run_dir / "eval" / "report_summary.json").read_text())
    for key in ("mAP", "mAUC", "acc"):
        assert report[key] == pytest.approx(got[key], abs=1e-6)


@pytest.mark.slow
def test_a_finished_run_started_again_does_not_score_eval_again(val_run: dict) -> None:
    run_dir, again = val_run["run_dir"], val_run["again"]
    assert "eval forward:" not in again.stderr
    assert "already written by an earlier process of this run" in again.stderr
    assert (run_dir / "eval" / "report_summary.json").read_text() == val_run["report"]
    kinds = [r.get("eval") for r in jsonl(run_dir / "metrics.jsonl")]
    assert kinds.count("report") == 1


def test_select_metric_is_checked_and_the_reported_model_follows_the_config() -> None:
    from cmkd_scale.config import ConfigError, load_config
    from cmkd_scale.train.report import reported_checkpoint

    with pytest.raises(ConfigError, match=r"eval\.select_metric"):
        load_config(None, ["eval.select_metric=loss"])
    wa = ["eval.wa_start_epoch=2", "eval.wa_end_epoch=4"]
    assert reported_checkpoint(load_config(None, ["data.val=v", *wa])) == "models/best.pt"
    assert reported_checkpoint(load_config(None, wa)) == "models/wa.pt"
    assert reported_checkpoint(load_config(None)) == "models/final.pt"

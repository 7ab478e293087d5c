"""The training benchmark and the GPU proof script, run for real on CPU at toy size.

Real components throughout: shards from the real prep, the DALI loader, DeepSpeed over gloo
with 2 ranks, the frozen teacher, the features CLI. Only the presence and consistency of the
figures are checked, never their speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "MLFLOW_DISABLE_TELEMETRY": "true"}


def _check_stage(s: dict, *, ranks: int) -> None:
    """One stage's record: every figure present and consistent with the others."""
    assert s["ranks"] == ranks
    assert s["clips_per_s"] > 0 and s["student_only_clips_per_s"] > 0
    assert s["clips_per_s_per_device"] == pytest.approx(s["clips_per_s"] / ranks, rel=1e-2)
    assert 0 <= s["data_wait_frac_steady"] <= s["data_wait_frac"] < 1
    split = s["split_ms"]
    assert set(split) == {
        "data_wait_ms",
        "teacher_ms",
        "forward_ms",
        "backward_ms",
        "optimizer_ms",
        "other_ms",
        "step_ms",
    }
    timed = [split[k] for k in ("teacher_ms", "forward_ms", "backward_ms", "optimizer_ms")]
    assert all(t > 0 for t in timed)
    assert sum(timed) + split["data_wait_ms"] <= split["step_ms"] * 1.01
    flops = s["flops_per_micro_step"]
    assert flops["step"] == pytest.approx(flops["teacher"] + flops["student"])
    assert flops["teacher"] > 0 and flops["student"] > flops["teacher"] / 100
    assert s["mfu"] > 0 and s["mfu_student_only"] > 0
    assert "fp32 2048^2 matmul on the CPU" in s["peak_source"]
    assert s["memory"]["kind"] == "cpu_peak_rss"
    assert len(s["memory"]["peak_gib_per_rank"]) == ranks
    assert all(0.1 < m < 20 for m in s["memory"]["peak_gib_per_rank"])


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path: Path) -> None:
    """gpu_check.sh --dry-run: every step runs, one JSON with targets, a log next to it."""
    out = tmp_path / "gpu_check_dry.json"
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    log = out.with_suffix(".log").read_text()
    assert set(result["steps"]) >= {"gpu_tests", "feature_parity", "train", "projection"}
    assert result["failed_steps"] == []
    assert result["mode"].startswith("dry-run")
    # the GPU tests exist and are skipped without a GPU (so that target fails here)
    assert result["gpu_tests"]["tests"] > 0
    assert result["gpu_tests"]["skipped"] == result["gpu_tests"]["tests"]
    # CPU features through the CLI are the same pipeline: they must match Kaldi here too
    parity = result["feature_parity"]
    assert parity["device"] == "cpu" and parity["clips"] == 2
    assert parity["max_abs_diff"] <= parity["tolerance"] == 0.05

    stage = result["train"]["cases"]["kd_ast"]["stages"]["zero2"]
    _check_stage(stage, ranks=2)
    assert stage["reference"]["clips_per_s"] > 0
    search = stage["micro_batch_search"]
    assert search["probes"] and "address-space cap" in search["limit"]
    for probe in search["probes"]:
        assert probe["fits"] == (probe["micro_batch"] <= search["largest_fitting"])
        if not probe["fits"]:
            assert "memory" in probe["error"] or "allocate" in probe["error"]

    rows = result["projection"]["rows"]
    assert [r["gpus"] for r in rows] == [1, 8, 64]
    assert rows[0]["epoch_s"] > rows[1]["epoch_s"] > rows[2]["epoch_s"] > 0
    assert any("NOT a GPU rate" in a for a in result["projection"]["assumptions"])

    targets = [t["target"] for t in result["targets"]]
    assert len(targets) == 4 and any("MFU >= 45%" in t for t in targets)
    for t in result["targets"]:
        assert f"{'PASS' if t['pass'] else 'FAIL'}  {t['target']}" in log


@pytest.mark.slow
def test_bench_train_cnn_student_zero3(tmp_path: Path) -> None:
    """KD-CNN at ZeRO-3 (parameters partitioned over 2 gloo ranks), reference in the same run.

    The batch search's out-of-memory path is caused for real: a 50 MiB address-space cap on
    the probe process is too small for any training step, so every probe must report OOM.
    """
    out = tmp_path / "train.json"
    cmd = [sys.executable, str(ROOT / "bench" / "bench_train.py"), "--size", "dry",
           "--cases", "kd_cnn", "--stages", "3", "--reference-stage", "3",
           "--search", "--max-probes", "2", "--mem-cap-gib", "0.05",
           "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["settings"]["size"] == "dry" and result["settings"]["ranks"] == 2
    stage = result["cases"]["kd_cnn"]["stages"]["zero3"]
    _check_stage(stage, ranks=2)
    assert stage["reference"]["ratio_ours_to_reference"] > 0
    search = stage["micro_batch_search"]
    assert (search["largest_fitting"], search["first_failing"]) == (0, 1)
    assert [p["micro_batch"] for p in search["probes"]] == [2, 1]
    for probe in search["probes"]:  # the allocator's or oneDNN's failed allocation
        assert "can't allocate memory" in probe["error"] or "create a primitive" in probe["error"]
    assert "kd_cnn ZeRO-3:" in proc.stdout and "teacher overhead" in proc.stdout

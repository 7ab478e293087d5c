"""bench/bench_teacher_cache.py for real at its dry size: every figure present and consistent
(never their speed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_the_cache_benchmark_prints_and_writes_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "teacher_cache.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MLFLOW_DISABLE_TELEMETRY": "true"}
    cmd = [sys.executable, "bench/bench_teacher_cache.py", "--size", "dry",
           "--workdir", str(tmp_path / "work"), "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert "KD-CNN from the cache:" in proc.stdout
    assert r["online_clips_per_s"] > 0 and r["cached_clips_per_s"] > 0
    ratio = r["cached_clips_per_s"] / r["online_clips_per_s"]
    assert r["speedup_cached_vs_online"] == pytest.approx(ratio, abs=0.01)
    assert r["online_teacher_ms_per_step"] > 0 and r["teacher_pass_rows_per_s"] > 0
    per_view = r["cache_bytes_per_clip_per_view"]
    classes = 527  # the synthetic shards carry AudioSet's class index
    k = r["setup"]["top_k"]
    # npy headers aside: 2 bytes a class (full), 4 K + 2 (top K)
    assert 2 * classes <= per_view["full"] < 2 * classes + 16
    assert 4 * k + 2 <= per_view[f"top{k}"] < 4 * k + 2 + 16
    assert r["kd_loss_full_vs_online_step1_rel"] < 1e-3  # same teacher logits to fp16
    assert 0 <= r["kd_loss_topk_vs_full_step1_rel"] < 0.05
    flops = r["flops_per_clip"]
    assert flops["teacher_forward"] > 10 * flops["student_train_step"] > 0
    want = (flops["teacher_forward"] + flops["student_train_step"]) / flops["student_train_step"]
    assert r["projected_speedup_full_sizes"] == pytest.approx(want, abs=0.06)
    assert r["audioset"]["full_logits_gb"] == pytest.approx(2e6 * 5 * 1054 / 1e9, abs=0.06)

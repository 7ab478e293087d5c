"""The benchmarks' arithmetic on its own: FLOP counting fixes, batch search, MFU, projection."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import _gpu_check_report  # noqa: E402
import bench_train  # noqa: E402
import project  # noqa: E402
from _common import gpu_peak_flops  # noqa: E402
from _flops import flop_counter  # noqa: E402

from cmkd_scale.config import load_config  # noqa: E402


def test_depthwise_conv_backward_counts_one_forward_per_gradient() -> None:
    """torch's counter multiplies a depthwise weight gradient by the channel count; ours not."""
    batch, channels, size, k = 2, 32, 16, 3
    x = torch.randn(batch, channels, size, size, requires_grad=True)
    w = torch.randn(channels, 1, k, k, requires_grad=True)
    forward = 2 * batch * channels * size * size * k * k  # padding keeps 16x16
    with flop_counter() as counter:
        F.conv2d(x, w, padding=1, groups=channels).sum().backward()
    assert counter.get_total_flops() == 3 * forward  # forward + input grad + weight grad


def test_cpu_attention_is_counted() -> None:
    b, h, n, d = 2, 3, 50, 16
    q = torch.randn(b, h, n, d, requires_grad=True)
    with flop_counter() as counter:
        F.scaled_dot_product_attention(q, q, q).sum().backward()
    forward = 4 * b * h * n * n * d  # QK^T and AV
    assert counter.get_total_flops() == forward + 5 * forward // 2  # torch's sdpa formulas


@pytest.mark.parametrize("capacity", [1, 3, 7, 48, 100, 1000])
@pytest.mark.parametrize("start", [1, 4, 48])
def test_largest_fitting_brackets_the_capacity(capacity: int, start: int) -> None:
    tried: list[int] = []

    def fits(batch: int) -> bool:
        tried.append(batch)
        return batch <= capacity

    lo, hi = bench_train.largest_fitting(fits, start, max_probes=20)
    assert lo <= capacity < hi
    assert hi - lo <= max(1, lo // 8)
    assert len(tried) == len(set(tried))  # no batch tried twice


def test_largest_fitting_stops_at_the_probe_budget() -> None:
    lo, hi = bench_train.largest_fitting(lambda b: b <= 1000, 4, max_probes=3)
    assert (lo, hi) == (16, None)  # 4, 8, 16 fit; no failure seen yet


def test_none_fits() -> None:
    assert bench_train.largest_fitting(lambda b: False, 8, max_probes=10) == (0, 1)


def _rank(step_ms: float, student_ms: float) -> dict:
    run = {"steps": 4, "wall_s": 0.0, "data_wait_frac": 0.01, "data_wait_frac_steady": 0.005}
    run["epoch_starts"] = 1
    return {
        "peak_flops": 1e12,
        "peak_source": "test",
        "kd": {**run, "step_ms": step_ms, "clips_per_s": 2 * 8 / (step_ms / 1000)},
        "student_only": {**run, "step_ms": student_ms, "clips_per_s": 2 * 8 / (student_ms / 1000)},
        "split": {"teacher_ms": 10.0, "step_ms": step_ms},
        "flops": {"step": 3e11, "teacher": 1e11, "student": 2e11},
        "memory": {"kind": "cpu_peak_rss", "peak_gib": 1.0},
    }


def test_summary_mfu_and_teacher_overhead() -> None:
    s = bench_train.summarize([_rank(500.0, 250.0), _rank(500.0, 250.0)], micro_batch=8)
    assert s["mfu"] == pytest.approx(3e11 / 0.5 / 1e12)
    assert s["mfu_student_only"] == pytest.approx(2e11 / 0.25 / 1e12)
    assert s["teacher_overhead"]["clips_per_s_ratio_with_to_without"] == pytest.approx(0.5)
    assert s["clips_per_s_per_device"] == pytest.approx(s["clips_per_s"] / 2)
    assert s["data_wait_frac_steady"] <= s["data_wait_frac"]


@pytest.mark.parametrize("size", sorted(bench_train.SIZES))
@pytest.mark.parametrize("case", sorted(bench_train.CASES))
def test_case_configs_resolve(size: str, case: str, tmp_path: Path) -> None:
    """Every benchmark config is a valid Config, with the teacher of the other family."""
    overrides = bench_train.case_overrides(
        case, bench_train.SIZES[size], tmp_path, tmp_path / "run", 3
    )
    cfg = load_config(None, overrides)
    assert cfg.deepspeed.zero_stage == 3
    assert {cfg.model.arch, cfg.teacher.arch} == {"ast", "efficientnet"}
    assert cfg.model.arch == ("ast" if case == "kd_ast" else "efficientnet")
    if size == "full":
        assert cfg.data.target_length == 1024 and cfg.deepspeed.precision == "bf16"
        assert "efficientnet_b2" in (cfg.model.name + cfg.teacher.name)
        ast = cfg.model if case == "kd_ast" else cfg.teacher
        assert (ast.fstride, ast.tstride, ast.embed_dim, ast.depth) == (10, 10, 0, 0)


def test_projection_arithmetic() -> None:
    out = project.project(
        100.0, 5.0, clips=1_000_000, missing=0.1, gpus=[1, 8, 64], efficiency={1: 1.0, 8: 0.9}
    )
    assert out["clips_present"] == 900_000
    assert out["decode_cores_per_gpu"] == pytest.approx(0.5)
    rows = {r["gpus"]: r for r in out["rows"]}
    assert rows[1]["epoch_s"] == pytest.approx(9000.0)
    assert rows[8]["epoch_s"] == pytest.approx(900_000 / (100 * 8 * 0.9), abs=0.1)
    assert rows[64]["efficiency"] == 0.9  # the largest stated count at or below 64


def test_efficiency_parse_rejects_nonsense() -> None:
    assert project.parse_efficiency("8=0.9,64=0.8") == {1: 1.0, 8: 0.9, 64: 0.8}
    with pytest.raises(ValueError, match="efficiency must be"):
        project.parse_efficiency("8=1.5")


def test_gpu_peak_table() -> None:
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
    assert gpu_peak_flops("NVIDIA H200") == pytest.approx(989.4e12)
    assert gpu_peak_flops("NVIDIA H100 PCIe") == pytest.approx(756e12)
    assert gpu_peak_flops("Some GPU") is None


def test_gpu_check_targets() -> None:
    good = {
        "gpu_tests": {"tests": 5, "failures": 0, "errors": 0, "skipped": 0},
        "feature_parity": {"max_abs_diff": 0.02, "tolerance": 0.05, "pass": True},
        "train": {"cases": {"kd_ast": {"stages": {"zero2": {"mfu": 0.5, "data_wait_frac": 0.01}}}}},
    }
    assert all(t["pass"] for t in _gpu_check_report.targets(good))
    slow = {**good, "train": {"cases": {"kd_ast": {"stages": {"zero2": {"mfu": 0.3}}}}}}
    verdicts = [t["pass"] for t in _gpu_check_report.targets(slow)]
    assert verdicts == [True, True, False, False]
    stage = {"mfu": 0.5, "data_wait_frac": 0.2, "data_wait_frac_steady": 0.01}
    rebuilds = {**good, "train": {"cases": {"kd_ast": {"stages": {"zero2": stage}}}}}
    assert _gpu_check_report.targets(rebuilds)[3]["pass"]  # steady share is judged
    skipped = {**good, "gpu_tests": {"tests": 5, "failures": 0, "errors": 0, "skipped": 5}}
    assert not _gpu_check_report.targets(skipped)[0]["pass"]

"""Helpers shared by the training benchmarks: machine facts, shards, JSON, peak FLOP/s."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Dense bf16 tensor-core peaks per device (NVIDIA datasheets, no sparsity), in FLOP/s.
# Matched against torch.cuda.get_device_name(); the first matching entry wins.
GPU_PEAK_BF16 = (
    ("H100 PCIe", 756.0e12),
    ("H100 NVL", 835.0e12),
    ("H100", 989.4e12),  # SXM (the device name says "H100 80GB HBM3")
    ("H200", 989.4e12),  # same compute die as the H100 SXM
    ("A100", 312.0e12),
)


def machine_info() -> dict[str, Any]:
    """Where a figure was measured: platform, cores, load, GPU, library versions."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return info


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` (pretty, trailing newline) creating the folder; atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def make_shards(folder: Path, *, clips: int, duration_s: float, shard_size: int = 64) -> Path:
    """``clips`` synthetic AudioSet-format clips through the real prep; the shard folder."""
    from cmkd_scale.demo.synth import make_synthetic_shards

    out = folder / "shards"
    if (out / "manifest.json").is_file():
        return out
    return make_synthetic_shards(
        out,
        raw_dir=folder / "raw",
        num_clips=clips,
        duration_s=duration_s,
        shard_size=shard_size,
        workers=max(1, min(8, (os.cpu_count() or 1) - 1)),
    )


def gpu_peak_flops(name: str) -> float | None:
    """Datasheet dense bf16 peak for a GPU name, None when the table does not know it."""
    for needle, peak in GPU_PEAK_BF16:
        if needle in name:
            return peak
    return None


def measured_matmul_flops(
    device: torch.device, dtype: torch.dtype, *, n: int = 2048, seconds: float = 2.0
) -> float:
    """FLOP/s of repeated ``n x n`` matmuls on ``device`` (the best of short rounds)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.matmul(a, b)  # warm-up (threads, kernels)
    sync()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        reps = 3
        start = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b)
        sync()
        best = max(best, reps * 2 * n**3 / (time.perf_counter() - start))
    return best


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """Peak FLOP/s per device for MFU, and where the number comes from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name) if dtype == torch.bfloat16 else None
        if peak is not None:
            return peak, f"datasheet dense bf16 peak of {name}"
        peak = measured_matmul_flops(device, dtype, n=8192)
        return peak, f"measured {dtype} 8192^2 matmul on {name} (not in the datasheet table)"
    threads = torch.get_num_threads()
    peak = measured_matmul_flops(device, torch.float32)
    return peak, f"measured fp32 2048^2 matmul on the CPU with {threads} thread(s) (no datasheet)"

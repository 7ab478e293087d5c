"""Facts about the process and machine a run executes on: run tags and system-metric samples.

No MLflow here: ``tracking`` turns these into tags and ``system/*`` metrics.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil

from cmkd_scale import sha256_of

log = logging.getLogger(__name__)

_SLURM_TAGS = {
    "SLURM_JOB_ID": "slurm.job_id",
    "SLURM_ARRAY_JOB_ID": "slurm.array_job_id",
    "SLURM_ARRAY_TASK_ID": "slurm.array_task_id",
    "SLURM_JOB_NUM_NODES": "slurm.num_nodes",
    "SLURM_NTASKS": "slurm.ntasks",
    "SLURM_JOB_PARTITION": "slurm.partition",
    "SLURM_JOB_NODELIST": "slurm.nodelist",
}


def git_commit(repo: Path | None = None) -> str:
    """HEAD commit of the source checkout (with ``-dirty`` when modified), or ``unknown``."""
    repo = repo or Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}-dirty" if dirty else head


def gpu_name() -> str:
    """Name of the first visible NVIDIA GPU via NVML, or ``none``."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            count = pynvml.nvmlDeviceGetCount()
            if count == 0:
                return "none"
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
            name = name.decode() if isinstance(name, bytes) else name
            return f"{count}x {name}"
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no library, no device: all mean "no GPU"
        return "none"


def url_sha256(path: str) -> str:
    """SHA-256 of a local file or fsspec URL, or ``unavailable`` when it cannot be read."""
    try:
        import fsspec

        with fsspec.open(path, "rb") as fh:
            return sha256_of(fh)[0]
    except Exception as exc:  # a missing manifest must not stop training
        log.warning("cannot hash %s for the run tags: %s", path, exc)
        return "unavailable"


def manifest_path(data_location: str) -> str:
    """The manifest.json behind a shard dir, manifest path or URL (as cmkd_scale.data reads)."""
    if not data_location or data_location.endswith(".json"):
        return data_location
    return data_location.rstrip("/") + "/manifest.json"


def manifest_summary(path: str) -> dict[str, Any] | None:
    """The prep manifest without its per-class and per-shard lists (for an artifact)."""
    try:
        import fsspec

        with fsspec.open(path, "rt") as fh:
            manifest = json.load(fh)
    except Exception as exc:
        log.warning("cannot read data manifest %s for the run record: %s", path, exc)
        return None
    shards = manifest.get("shards", [])
    return {
        "manifest": path,
        "format": manifest.get("format"),
        "num_samples": manifest.get("num_samples"),
        "num_classes": manifest.get("num_classes"),
        "num_shards": len(shards),
        "bytes": sum(int(s.get("bytes", 0)) for s in shards),
        "num_missing": manifest.get("num_missing"),
        "num_failed": manifest.get("num_failed"),
        "sources": manifest.get("sources"),
        "settings": manifest.get("settings"),
        "classes_present": sum(1 for c in manifest.get("class_counts", []) if c > 0),
    }


def run_tags(cfg: Any) -> dict[str, str]:
    """Tags every run carries: code version, command, cluster placement, models, data."""
    tags = {
        "git_commit": git_commit(),
        "command": shlex.join([sys.executable, *sys.argv]),
        "host": socket.gethostname(),
        "gpu": gpu_name(),
        "world_size": os.environ.get("WORLD_SIZE", "1"),
        "student": student_name(cfg),
        "teacher": "none"
        if cfg.teacher.arch == "none"
        else f"{cfg.teacher.arch}:{cfg.teacher.name}",
    }
    tags.update({tag: os.environ[var] for var, tag in _SLURM_TAGS.items() if var in os.environ})
    for split in ("train", "val", "eval"):
        location = getattr(cfg.data, split, "")
        if location:
            path = manifest_path(location)
            tags[f"data.{split}.manifest"] = path
            tags[f"data.{split}.sha256"] = url_sha256(path)
    return tags


def student_name(cfg: Any) -> str:
    return f"{cfg.model.arch}:{cfg.model.name}"


def source_tags(commit: str) -> dict[str, str]:
    """MLflow's source tags (the runs table's Source column): the entry point that runs."""
    main = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    name = "python"
    if main is not None:
        package_root = Path(__file__).resolve().parents[2]
        try:  # python -m cmkd_scale.train -> cmkd_scale.train
            rel = main.with_suffix("").relative_to(package_root)
            parts = rel.parts[:-1] if rel.name == "__main__" else rel.parts
            name = ".".join(parts)
        except ValueError:
            name = main.name
    tags = {"mlflow.source.name": name, "mlflow.source.type": "LOCAL"}
    if commit and commit != "unknown":
        tags["mlflow.source.git.commit"] = commit.removesuffix("-dirty")
    return tags


def dataset_record(location: str, summary: dict[str, Any], sha: str, context: str) -> dict:
    """One shard set as an MLflow dataset input: its name, where it is, the manifest's sha256
    as the digest, and its size (samples, classes, shards, bytes) as the profile."""
    base = location.rstrip("/")
    if base.endswith(".json"):
        base = base.rsplit("/", 1)[0] if "/" in base else ""
    name = base.rsplit("/", 1)[-1] or location
    source = base if "://" in base else str(Path(base or ".").resolve())
    return {
        "name": name,
        "source": source,
        "digest": sha,
        "context": context,
        "profile": {
            "num_samples": summary.get("num_samples"),
            "num_classes": summary.get("num_classes"),
            "classes_present": summary.get("classes_present"),
            "num_shards": summary.get("num_shards"),
            "bytes": summary.get("bytes"),
            "manifest_sha256": sha,
            "format": summary.get("format"),
        },
        "schema": {  # one sample of a shard: FLAC, JSON metadata, float32 multi-hot labels
            "mlflow_colspec": [
                {"type": "binary", "name": "flac", "required": True},
                {"type": "string", "name": "json", "required": True},
                {"type": "binary", "name": "labels", "required": True},
            ]
        },
    }


def pinned(distributions: tuple[str, ...]) -> list[str]:
    """``name==version`` of each installed distribution (a logged model's requirements)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in distributions:
        try:
            out.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            continue
    return out


class SystemSampler:
    """CPU, memory and (where NVML works) GPU readings named as MLflow's system metrics."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        psutil.cpu_percent(None)  # first call primes the counter
        self._nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._gpus = [
                pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())
            ]
        except Exception:
            self._gpus = []

    def sample(self) -> dict[str, float]:
        """One reading; keys follow MLflow's ``system/...`` names so the UI tab shows them."""
        mem = psutil.virtual_memory()
        out = {
            "system/cpu_utilization_percentage": psutil.cpu_percent(None),
            "system/system_memory_usage_megabytes": (mem.total - mem.available) / 2**20,
            "system/system_memory_usage_percentage": mem.percent,
            "system/process_rss_megabytes": self._process.memory_info().rss / 2**20,
        }
        for i, handle in enumerate(self._gpus):
            nvml = self._nvml
            util = nvml.nvmlDeviceGetUtilizationRates(handle)
            info = nvml.nvmlDeviceGetMemoryInfo(handle)
            out[f"system/gpu_{i}_utilization_percentage"] = float(util.gpu)
            out[f"system/gpu_{i}_memory_usage_megabytes"] = info.used / 2**20
            out[f"system/gpu_{i}_memory_usage_percentage"] = 100.0 * info.used / info.total
        return out

    def close(self) -> None:
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
            self._nvml = None

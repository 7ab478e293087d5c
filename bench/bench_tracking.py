"""Tracking cost on the training thread: our tracker vs MLflow's per-step logging, same server.

    .venv/bin/python bench/bench_tracking.py [--steps 300] [--hung-steps 10]

Starts a real ``mlflow server`` (launch/mlflow_server.sh, SQLite) and logs the same per-step
metrics (9 scalars, like the trainer's) two ways, each in its own run:

* reference: ``MlflowClient.log_batch`` once per step on the training thread (what
  ``mlflow.log_metrics(metrics, step=step)`` does), HTTP limits as our tracker sets them;
* ours: ``tracker.log_metrics`` (journal append + enqueue; a background thread batches).

Both with a healthy server, then with a hung one (SIGSTOP): per-step time on the training
thread (median / p99 / max), HTTP requests, ratio. Prints the figures and writes
bench/results/tracking.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric  # noqa: E402

from cmkd_scale.config import load_config  # noqa: E402
from cmkd_scale.tracking import make_tracker  # noqa: E402
from cmkd_scale.tracking.remote import bound_http  # noqa: E402

KEYS = ["loss", "label_loss", "kd_loss", "lr", "grad_norm", "clips_per_s", "data_wait_frac",
        "teacher_ms", "epoch"]  # fmt: skip
TIMEOUT_S = 2  # tracking.request_timeout_s for both ways in this bench
RETRIES = 0


def start_server(directory: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "CMKD_MLFLOW_DIR": str(directory), "CMKD_MLFLOW_HOST": "127.0.0.1",
           "CMKD_MLFLOW_PORT": str(port), "CMKD_PYTHON": sys.executable}  # fmt: skip
    log = (directory / "server.log").open("ab")
    proc = subprocess.Popen(
        ["bash", str(ROOT / "launch" / "mlflow_server.sh")],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            return proc, uri
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"mlflow server did not start; see {directory / 'server.log'}")


def metrics_at(step: int) -> dict[str, float]:
    return {k: 1.0 / (step + i + 1) for i, k in enumerate(KEYS)}


def summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "median_ms": 1e3 * statistics.median(ordered),
        "p99_ms": 1e3 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "max_ms": 1e3 * ordered[-1],
        "total_s": sum(ordered),
    }


def reference(client: MlflowClient, run_id: str, steps: range) -> tuple[list[float], int]:
    """One synchronous log_batch per step; a failed call costs its time and is lost."""
    times, failures = [], 0
    for step in steps:
        start = time.perf_counter()
        ts = int(time.time() * 1000)
        batch = [Metric(k, v, ts, step) for k, v in metrics_at(step).items()]
        try:
            client.log_batch(run_id, metrics=batch)
        except Exception:
            failures += 1
        times.append(time.perf_counter() - start)
    return times, failures


def ours(tracker, steps: range) -> list[float]:
    times = []
    for step in steps:
        start = time.perf_counter()
        tracker.log_metrics(metrics_at(step), step)
        times.append(time.perf_counter() - start)
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--hung-steps", type=int, default=10)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tracking.json")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_tracking_"))
    proc, uri = start_server(work)
    bound_http(TIMEOUT_S, RETRIES)
    results: dict[str, dict] = {}
    try:
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("bench") or client.get_experiment(
            client.create_experiment("bench")
        )
        ref_run = client.create_run(exp.experiment_id, run_name="reference").info.run_id
        overrides = [
            "model.arch=ast",
            f"tracking.uri={uri}",
            "tracking.experiment=bench",
            f"tracking.request_timeout_s={TIMEOUT_S}",
            f"tracking.max_retries={RETRIES}",
            "tracking.system_metrics=false",
            "tracking.finish_timeout_s=60",
        ]
        cfg = load_config(None, overrides)
        tracker = make_tracker(cfg, rank=0, run_dir=work / "run")
        calls = []
        real_send = tracker.remote.send_metrics
        tracker.remote.send_metrics = lambda pts: (calls.append(len(pts)), real_send(pts))[1]

        healthy = range(args.steps)
        ref_t, ref_fail = reference(client, ref_run, healthy)
        our_t = ours(tracker, healthy)
        tracker.sender.flush(60)
        results["healthy"] = {
            "reference": {**summary(ref_t), "http_requests": len(ref_t), "lost_steps": ref_fail},
            "ours": {**summary(our_t), "http_requests": len(calls), "lost_steps": 0},
        }
        os.killpg(proc.pid, signal.SIGSTOP)  # hung server: connections open, no answer
        hung = range(args.steps, args.steps + args.hung_steps)
        ref_t, ref_fail = reference(client, ref_run, hung)
        our_t = ours(tracker, hung)
        results["hung"] = {
            "reference": {**summary(ref_t), "lost_steps": ref_fail},
            "ours": {**summary(our_t), "lost_steps": 0, "note": "kept in the journal"},
        }
        os.killpg(proc.pid, signal.SIGCONT)
        tracker.finish()
    finally:
        os.killpg(proc.pid, signal.SIGCONT)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    for case, figures in results.items():
        ref, our = figures["reference"], figures["ours"]
        figures["ratio_total_time_reference_over_ours"] = ref["total_s"] / max(our["total_s"], 1e-9)
        print(
            f"{case:8s} per step on the training thread: reference median {ref['median_ms']:.2f} "
            f"ms, max {ref['max_ms']:.1f} ms; ours median {our['median_ms']:.3f} ms, max "
            f"{our['max_ms']:.2f} ms; reference/ours total time "
            f"{figures['ratio_total_time_reference_over_ours']:.0f}x"
        )
    print(
        f"HTTP requests for {args.steps} healthy steps: reference "
        f"{results['healthy']['reference']['http_requests']}, ours "
        f"{results['healthy']['ours']['http_requests']}"
    )
    report = {"steps": args.steps, "hung_steps": args.hung_steps, "metrics_per_step": len(KEYS),
              "request_timeout_s": TIMEOUT_S, "max_retries": RETRIES, "cpu_count": os.cpu_count(),
              "load_avg": os.getloadavg(), "results": results}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

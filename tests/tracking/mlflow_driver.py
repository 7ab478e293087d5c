"""A 2-rank driver that uses the tracker like the trainer (run by tests/fixtures/mlflow_server.py).

``python -m torch.distributed.run --nproc_per_node 2 tests/tracking/mlflow_driver.py`` trains a
tiny linear classifier over gloo, evaluates it with real AP/AUC, and drives the tracker through
every call the trainer makes, with optional faults: an exception (FAILED), a SIGTERM (KILLED,
resume point noted) and a resume that continues the same MLflow run.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

NUM_CLASSES = 6
CLASS_NAMES = [f"synthetic class {i}" for i in range(NUM_CLASSES)]


def _driver(argv: list[str]) -> int:
    import argparse
    import json

    import numpy as np
    import torch
    import torch.distributed as tdist
    from sklearn.metrics import average_precision_score, roc_auc_score

    from cmkd_scale.config import load_config
    from cmkd_scale.logs import setup_logging
    from cmkd_scale.tracking import make_tracker

    p = argparse.ArgumentParser()
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--uri", required=True)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--eval-every", type=int, default=6)
    p.add_argument("--fail-at", type=int, default=-1)
    p.add_argument("--sigterm-at", type=int, default=-1)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--override", action="append", default=[])
    args = p.parse_args(argv)
    setup_logging()
    tdist.init_process_group("gloo")
    rank, world = tdist.get_rank(), tdist.get_world_size()
    torch.manual_seed(rank)
    cfg = load_config(
        None,
        [
            f"run.dir={args.run_dir}",
            f"tracking.uri={args.uri}",
            "tracking.flush_every_s=1.0",
            "tracking.system_metrics_interval_s=1.0",
            "model.arch=ast",
            "model.name=tiny_linear",
            *args.override,
        ],
    )
    resume_file = args.run_dir / "resume.json"
    resume = json.loads(resume_file.read_text()) if resume_file.is_file() else {}
    tracker = make_tracker(cfg, rank=rank, run_dir=args.run_dir, resume_run_id=resume.get("run_id"))
    stop = {"requested": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))

    gen = torch.Generator().manual_seed(0)
    proto = torch.randn(NUM_CLASSES, 16, generator=gen)
    x_eval = torch.randn(64, 16, generator=gen)
    y_eval = (x_eval @ proto.T > 0.5).float()
    model = torch.nn.Linear(16, NUM_CLASSES)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    call_s: list[float] = []

    def timed(fn, *a, **kw):
        start = time.perf_counter()
        fn(*a, **kw)
        call_s.append(time.perf_counter() - start)

    step = int(resume.get("step", 0))
    with tracker:
        if not resume:
            timed(tracker.log_params, cfg.flat())
            timed(tracker.log_dict, {"zero_optimization": {"stage": 2}}, "deepspeed.json")
        timed(tracker.set_tags, {"world_size": str(world), "launcher": "torchrun"})
        while step < args.steps:
            start = time.perf_counter()
            x = torch.randn(32, 16)
            y = (x @ proto.T > 0.5).float()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
            opt.zero_grad()
            loss.backward()
            for param in model.parameters():  # data parallel by hand, over gloo
                tdist.all_reduce(param.grad)
                param.grad /= world
            opt.step()
            step += 1
            time.sleep(args.step_sleep)
            elapsed = time.perf_counter() - start
            metrics = {"loss": loss.item(), "lr": 0.5, "clips_per_s": 32 * world / elapsed}
            timed(tracker.log_metrics, metrics, step)
            if step == args.fail_at:
                raise RuntimeError(f"injected failure at step {step}")
            if step % args.eval_every == 0:
                with torch.no_grad():
                    probs = torch.sigmoid(model(x_eval)).numpy()
                truth = y_eval.numpy()
                ap = np.array([average_precision_score(truth[:, c], probs[:, c]) for c in range(6)])
                auc = np.array([roc_auc_score(truth[:, c], probs[:, c]) for c in range(6)])
                stats = {"mAP": ap.mean(), "mAUC": auc.mean(), "dprime": 1.0, "AP": ap, "AUC": auc}
                timed(tracker.log_eval, stats, step, step // args.eval_every, CLASS_NAMES)
            if step == args.sigterm_at:
                os.kill(os.getpid(), signal.SIGTERM)
            flag = torch.tensor([float(stop["requested"])])
            tdist.all_reduce(flag)
            if flag.item() > 0:  # preempted: save the resume point, end KILLED
                if rank == 0:
                    resume_file.write_text(json.dumps({"run_id": tracker.run_id, "step": step}))
                tracker.finish("KILLED", note=f"resume from {resume_file} at step {step}")
                break
        else:
            export = args.run_dir / "student.pt"
            if rank == 0:
                torch.save(model.state_dict(), export)
                timed(tracker.log_checkpoint, export)
    if rank == 0:
        (args.run_dir / "driver_timing.json").write_text(
            json.dumps({"max_call_s": max(call_s), "calls": len(call_s), "step": step})
        )
    tdist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(_driver(sys.argv[1:]))

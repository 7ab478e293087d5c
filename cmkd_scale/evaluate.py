"""Evaluation: predictions over the eval set, gathered across ranks once, scored as AudioSet.

Used by the trainer every epoch, and as a command on exported students::

    python -m cmkd_scale.evaluate --checkpoint run/models/best.pt [key=value ...]
    python -m cmkd_scale.evaluate --checkpoint a.pt --checkpoint b.pt     # ensemble
    python -m cmkd_scale.evaluate --wa run/ --wa-start 1 --wa-end 5       # weight averaging

Ensemble = mean of the members' sigmoid outputs (AST's checkpoint ensemble); weight averaging
= mean of the epoch students' weights, then one evaluation (AST / PSLA "WA").
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmkd_scale import dist
from cmkd_scale.checkpoint import atomic_torch_save, epoch_tag, load_export
from cmkd_scale.config import Config, ConfigError, from_dict, load_config, parse_overrides
from cmkd_scale.logs import setup_logging

log = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor], torch.Tensor]  # fbank [B,T,F] -> probabilities [B,C]


@dataclass
class EvalResult:
    summary: dict[str, float]  # mAP, mAUC, dprime, acc (every rank)
    class_ap: np.ndarray | None = None  # [C] (rank 0 only)
    class_auc: np.ndarray | None = None
    probs: np.ndarray | None = None  # [N, C] in global sample order (rank 0 only)
    targets: np.ndarray | None = None


def predict_local(
    forward: Forward, loader: Any, *, device: torch.device
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This rank's (index, probs, targets) for its share of the eval set, padding dropped."""
    indices, probs, targets = [], [], []
    batches, clips, start = 0, 0, time.perf_counter()
    with torch.no_grad():
        for batch in loader.batches():
            out = forward(batch.fbank.to(device, non_blocking=True)).float().cpu()
            valid = batch.valid.cpu().bool()
            indices.append(batch.index.cpu()[valid].numpy())
            probs.append(out[valid].numpy())
            targets.append(batch.labels.cpu()[valid].numpy())
            batches += 1
            clips += int(valid.sum())
    if batches != loader.steps:  # ZeRO-3 would deadlock on uneven batch counts; say so
        raise RuntimeError(f"eval loader gave {batches} batches, announced {loader.steps}")
    elapsed = time.perf_counter() - start
    log.info("eval forward: %d clips in %.1f s (%.1f clips/s)", clips, elapsed, clips / elapsed)
    if not indices:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    return np.concatenate(indices), np.concatenate(probs), np.concatenate(targets)


def assemble(
    parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], num_samples: int
) -> tuple[np.ndarray, np.ndarray]:
    """Place every rank's rows by global index; each eval clip must appear exactly once."""
    index = np.concatenate([p[0] for p in parts])
    counts = np.bincount(index, minlength=num_samples) if len(index) else np.zeros(num_samples)
    if len(counts) > num_samples or (counts != 1).any():
        dup = np.flatnonzero(counts > 1)[:5].tolist()
        miss = np.flatnonzero(counts[:num_samples] == 0)[:5].tolist()
        raise RuntimeError(
            f"eval predictions do not cover the {num_samples} eval clips exactly once "
            f"(duplicated indices {dup}, missing {miss}): the EvalLoader split is wrong"
        )
    width = next(p[1].shape[1] for p in parts if len(p[0]))
    probs = np.zeros((num_samples, width), np.float32)
    targets = np.zeros((num_samples, width), np.float32)
    for idx, p, t in parts:
        probs[idx], targets[idx] = p, t
    return probs, targets


def score(
    probs: np.ndarray, targets: np.ndarray
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """(summary, per-class AP, per-class AUC) via cmkd_scale.metrics."""
    from cmkd_scale.metrics import compute_stats, summarize

    stats = compute_stats(probs, targets)
    summary = {k: float(v) for k, v in summarize(stats).items()}
    return summary, np.asarray(stats["AP"], np.float64), np.asarray(stats["AUC"], np.float64)


def evaluate(forward: Forward, loader: Any, *, device: torch.device) -> EvalResult:
    """Predict on every rank, gather to rank 0 once, score there, share the summary."""
    local = predict_local(forward, loader, device=device)
    parts = dist.gather_objects(local)  # the one gather of this evaluation
    result = EvalResult(summary={})
    if parts is not None:
        probs, targets = assemble(parts, loader.num_samples)  # type: ignore[arg-type]
        summary, ap, auc = score(probs, targets)
        result = EvalResult(summary, ap, auc, probs, targets)
    result.summary = dist.broadcast_object(result.summary)  # type: ignore[assignment]
    return result


def write_class_ap_csv(
    path: Path, class_names: Sequence[str], ap: np.ndarray, auc: np.ndarray
) -> None:
    """Per-class AP/AUC with class names (NaN where a class has no positive clip)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["index", "display_name", "AP", "AUC"])
        for i, name in enumerate(class_names):
            writer.writerow([i, name, f"{ap[i]:.6f}", f"{auc[i]:.6f}"])


def save_result(result: EvalResult, out_dir: Path, name: str, class_names: Sequence[str]) -> Path:
    """Rank 0: ``<name>_class_ap.csv``, ``<name>_predictions.npz``, ``<name>_summary.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    assert result.class_ap is not None and result.class_auc is not None
    csv_path = out_dir / f"{name}_class_ap.csv"
    write_class_ap_csv(csv_path, class_names, result.class_ap, result.class_auc)
    np.savez_compressed(
        out_dir / f"{name}_predictions.npz", probs=result.probs, targets=result.targets
    )
    (out_dir / f"{name}_summary.json").write_text(json.dumps(result.summary, indent=2) + "\n")
    return csv_path


# ------------------------------------------------------------------ exported students


def build_student(payload: dict[str, Any], device: torch.device) -> torch.nn.Module:
    """The student network of an export, weights loaded strictly, in eval mode."""
    from cmkd_scale.models import build_model

    cfg = from_dict(payload["config"])
    model = build_model(
        cfg.model,
        num_classes=payload["num_classes"],
        input_tdim=cfg.data.target_length,
        input_fdim=cfg.data.num_mel_bins,
    )
    model.load_state_dict(payload["model"], strict=True)
    return model.to(device).eval()


def average_weights(paths: Sequence[Path]) -> dict[str, Any]:
    """AST/PSLA weight averaging: the mean of several exports of one architecture."""
    first = load_export(paths[0])
    total = {k: v.double() if v.is_floating_point() else v for k, v in first["model"].items()}
    for path in paths[1:]:
        sd = load_export(path)["model"]
        same = sd.keys() == total.keys() and all(sd[k].shape == total[k].shape for k in sd)
        if not same:
            raise ValueError(f"{path} has different parameters than {paths[0]}; cannot average")
        for k, v in sd.items():
            if v.is_floating_point():
                total[k] += v.double()
    averaged = {
        k: (v / len(paths)).float() if v.is_floating_point() else v for k, v in total.items()
    }
    return {**first, "model": averaged, "source_checkpoint": [str(p) for p in paths]}


def wa_paths(run_dir: Path, start: int, end: int) -> list[Path]:
    """The epoch exports ``models/epoch-<e>.pt`` for epochs start..end (inclusive)."""
    if not 1 <= start <= end:
        raise ConfigError(f"weight averaging range {start}..{end}: need 1 <= start <= end")
    paths = [run_dir / "models" / f"{epoch_tag(e)}.pt" for e in range(start, end + 1)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"weight averaging needs {missing}; did those epochs finish?")
    return paths


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cmkd_scale.evaluate", description=__doc__)
    p.add_argument(
        "--checkpoint",
        action="append",
        type=Path,
        default=[],
        help="exported student (.pt); repeat for an ensemble",
    )
    p.add_argument("--wa", type=Path, help="run dir whose epoch students to weight-average")
    p.add_argument(
        "--wa-start", type=int, default=0, help="first epoch (default eval.wa_start_epoch)"
    )
    p.add_argument("--wa-end", type=int, default=0, help="last epoch (default eval.wa_end_epoch)")
    p.add_argument("--out", type=Path, help="output dir (default: <run dir>/eval)")
    p.add_argument("--name", default="", help="output file prefix")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. data.eval=DIR")
    return p.parse_args(argv)


def _config_with_overrides(payload: dict[str, Any], overrides: list[str]) -> Config:
    tree = payload["config"]
    for key, value in parse_overrides(overrides):
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return from_dict(tree)


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate one export, an ensemble of exports, or a weight average of epoch exports."""
    setup_logging()
    args = _parse_args(argv)
    if bool(args.checkpoint) == bool(args.wa):
        raise SystemExit("give --checkpoint PATH (repeatable) or --wa RUN_DIR, not both")
    env = dist.resolve_dist_env()
    dist.init_torch_process_group(env)
    device = dist.device_for(env)
    try:
        if args.wa:
            run_cfg = load_config(args.wa / "config.yaml")  # the trainer's resolved config
            start = args.wa_start or run_cfg.eval.wa_start_epoch
            end = args.wa_end or run_cfg.eval.wa_end_epoch
            paths = wa_paths(args.wa, start, end)
            payload = average_weights(paths)
            name = args.name or f"wa-{start:03d}-{end:03d}"
            out_dir = args.out or args.wa / "eval"
            if env.is_main:
                atomic_torch_save(payload, args.wa / "models" / f"{name}.pt")
            payloads = [payload]
        else:
            payloads = [load_export(p) for p in args.checkpoint]
            name = args.name or ("ensemble" if len(payloads) > 1 else args.checkpoint[0].stem)
            out_dir = args.out or args.checkpoint[0].resolve().parent.parent / "eval"
        cfg = _config_with_overrides(payloads[0], args.overrides)
        models = [build_student(p, device) for p in payloads]

        def forward(fbank: torch.Tensor) -> torch.Tensor:
            return torch.stack([torch.sigmoid(m(fbank).float()) for m in models]).mean(0)

        from cmkd_scale.data import EvalLoader

        loader = EvalLoader(
            cfg.data,
            micro_batch=cfg.deepspeed.eval_batch or cfg.deepspeed.micro_batch,
            rank=env.rank,
            world_size=env.world_size,
            device="gpu" if device.type == "cuda" else "cpu",
        )
        result = evaluate(forward, loader, device=device)
        if env.is_main:
            csv_path = save_result(result, out_dir, name, payloads[0]["class_names"])
            log.info("%s: %s (per-class AP: %s)", name, result.summary, csv_path)
            print(json.dumps({"name": name, **result.summary}))
    finally:
        dist.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())

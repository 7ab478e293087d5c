"""Loader cost: CPU milliseconds per clip and clips/s, DALI pipeline versus AST's reference way.

Same shards for both (synthetic 10 s clips through the real prep), same clips, same number of
clips per pass. In one run, alternating pass by pass:
  * ours, training: TrainLoader (planned sampling, range reads, DALI decode + mixup + Kaldi
    fbank + pad/crop + SpecAugment + normalisation) for one epoch;
  * reference, training: a torch DataLoader over AST's dataset code (decode each clip, mixup,
    kaldi.fbank, torchaudio Frequency/TimeMasking, normalisation per item);
  * the same two in eval mode (no augmentation): EvalLoader versus the reference w/o masks;
  * ours, decode only: the same reads and DALI decoding with nothing after it, i.e. the CPU
    work that stays on the CPU when the features are computed on a GPU.
CPU time is user+system time of the whole process (every thread) plus its waited-for children
(``resource.getrusage`` SELF + CHILDREN, so DataLoader worker processes count too). Both sides
get the same thread count: DALI ``num_threads`` = ``--threads``, the reference runs
``--threads - 1`` DataLoader workers (0 = in-process) with one torch thread each. Every loader
is built and run once before measuring (warm-up, not counted): ours keeps its DALI pipeline
from pass to pass as the trainer does. Each figure is the median of ``--repeats`` passes (all
kept in the JSON, with the 1-minute load average during each pass): on a shared machine other
processes inflate CPU time. With a CUDA GPU the script also measures the pipeline with
``device="gpu"`` (clips/s, CPU ms per clip) and the GPU features' parity with Kaldi.

    .venv/bin/python bench/bench_loader.py [--clips 96] [--batch 16] [--threads 1]
                                           [--repeats 5] [--out bench/results/loader.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cmkd_scale.config import DataConfig  # noqa: E402
from cmkd_scale.data import EvalLoader, TrainLoader  # noqa: E402
from cmkd_scale.data.manifest import ShardSet  # noqa: E402
from cmkd_scale.data.members import MemberReader  # noqa: E402
from cmkd_scale.data.pipeline import DaliRunner, FeatureSpec  # noqa: E402
from cmkd_scale.data.reference import ReferenceDataset, decode, kaldi_fbank  # noqa: E402
from cmkd_scale.demo.synth import make_synthetic_shards  # noqa: E402

GOAL = 0.5  # ours / reference CPU time per clip


def make_shards(folder: Path, clips: int) -> Path:
    """``clips`` synthetic 10 s AudioSet-format clips through the real prep."""
    return make_synthetic_shards(
        folder / "shards", raw_dir=folder, num_clips=clips, duration_s=10.0, shard_size=32
    )


def cpu_seconds() -> float:
    """User+system CPU seconds of this process (all threads) and its waited-for children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def measure(batches: Callable[[], Iterable], clips_of: Callable[[object], int]) -> dict:
    """Run one pass; wall time, process CPU time, per-clip figures, machine load."""
    wall0, cpu0 = time.perf_counter(), cpu_seconds()
    clips = 0
    for batch in batches():
        clips += clips_of(batch)
    wall, cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
    return {
        "clips": clips,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "clips_per_s": round(clips / wall, 2),
        "cpu_ms_per_clip": round(1000 * cpu / clips, 3),
        "load_1min": round(os.getloadavg()[0], 2),
    }


def ours_passes(cfg: DataConfig, batch: int, device: str) -> dict[str, Callable]:
    """Our loaders, built once (the trainer keeps them): a training epoch, an eval pass, and
    the decode-only share of both."""
    train = TrainLoader(cfg, micro_batch=batch, rank=0, world_size=1, seed=0, device=device)
    evaluation = EvalLoader(cfg, micro_batch=batch, rank=0, world_size=1, device=device)
    sync = torch.cuda.synchronize if device == "gpu" else (lambda: None)
    epochs = iter(range(1_000_000))

    def train_pass():
        for b in train.epoch_batches(next(epochs)):
            sync()
            yield b

    def eval_pass():
        for b in evaluation.batches():
            sync()
            yield b

    out = {"train": train_pass, "eval": eval_pass}
    if device == "cpu":
        out.update(decode_only_passes(cfg, batch, train, evaluation))
    return out


def decode_only_passes(
    cfg: DataConfig, batch: int, train: TrainLoader, evaluation: EvalLoader
) -> dict[str, Callable]:
    """Reads + checks + DALI decoding (primary and mixup partner) and nothing after: what a
    GPU run leaves on the CPU, before the host-to-device copy."""
    train_spec = dataclasses.replace(train.spec, decode_only=True)
    eval_spec = dataclasses.replace(evaluation.spec, decode_only=True)
    epochs = iter(range(1_000_000))
    shards = evaluation.shards
    plans: list = []
    train_runner = DaliRunner(
        spec=train_spec,
        device="cpu",
        batch_size=batch,
        num_threads=cfg.num_threads,
        prefetch=cfg.prefetch,
        source=lambda: train.step_inputs(next(plans[-1])),
    )
    eval_runner = DaliRunner(
        spec=eval_spec,
        device="cpu",
        batch_size=batch,
        num_threads=cfg.num_threads,
        prefetch=cfg.prefetch,
        tar_paths=[shards.path(s) for s in shards.shards],
        index_paths=[shards.index_path(s) for s in shards.shards],
    )

    def train_pass():
        plans.append(train.sampler.plans(next(epochs)))
        for _ in range(train.steps_per_epoch):
            yield train_runner.run()[1]
        if train_runner.at_epoch_end():
            train_runner.rewind()

    def eval_pass():
        for _ in range(eval_runner.batches_per_epoch()):
            yield eval_runner.run()[1]

    return {"train_decode_only": train_pass, "eval_decode_only": eval_pass}


def reference_passes(cfg: DataConfig, batch: int, workers: int) -> dict[str, Callable]:
    """AST's dataset code in a torch DataLoader (workers' CPU time counted as children)."""
    out = {}
    for mode, train in (("train", True), ("eval", False)):
        dataset = ReferenceDataset(cfg.train, cfg, train=train)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch, shuffle=train, num_workers=workers, drop_last=train
        )
        out[mode] = lambda loader=loader: loader
    return out


def median_of(runs: list[dict]) -> dict:
    """Median figures over the passes, every pass kept."""
    keys = ("wall_s", "cpu_s", "clips_per_s", "cpu_ms_per_clip", "load_1min")
    summary = {k: round(statistics.median(r[k] for r in runs), 3) for k in keys}
    return {"clips": runs[0]["clips"], **summary, "runs": runs}


def compare(cfg: DataConfig, batch: int, repeats: int, device: str, workers: int) -> dict:
    """Ours and the reference, alternating pass by pass so both see the same machine load."""
    ours = ours_passes(cfg, batch, device)
    ref = reference_passes(cfg, batch, workers) if device == "cpu" else {}
    clips_of = {
        "train": lambda b: len(b.keys),
        "eval": lambda b: int(b.valid.sum()),
        "train_decode_only": len,
        "eval_decode_only": len,
        "ref": lambda b: len(b[0]),
    }
    passes = [(f"ours_{m}", fn, clips_of[m]) for m, fn in ours.items()]
    passes += [(f"ref_{m}", fn, clips_of["ref"]) for m, fn in ref.items()]
    for _, fn, count in passes:  # warm-up: builds, page cache, first-call allocations
        measure(fn, count)
    runs: dict[str, list] = {name: [] for name, _, _ in passes}
    order = sorted(passes, key=lambda p: p[0].split("_")[1])  # train: ours, ref; eval: ...
    for _ in range(repeats):
        for name, fn, count in order:
            runs[name].append(measure(fn, count))
    return {name: median_of(value) for name, value in runs.items()}


def gpu_parity(shards: Path, batch: int, threads: int) -> float:
    """Max |GPU log-mel - kaldi.fbank| over all clips (unnormalised, unpadded)."""
    cfg = DataConfig(eval=str(shards), num_threads=threads)
    spec = FeatureSpec(target_length=None, normalize=False)
    loader = EvalLoader(cfg, micro_batch=batch, rank=0, world_size=1, device="gpu", spec=spec)
    reader = MemberReader(ShardSet(str(shards)))
    table = reader.table
    worst = 0.0
    for key, feats in loader.feature_arrays():
        sample = reader.read(table.keys.index(key))
        ref = kaldi_fbank(decode(sample.flac)).numpy()
        worst = max(worst, float(np.abs(feats - ref).max()))
    return worst


def ratio(ours: dict, ref: dict) -> float:
    return round(ours["cpu_ms_per_clip"] / ref["cpu_ms_per_clip"], 3)


def run_cpu(cfg: DataConfig, args: argparse.Namespace) -> dict:
    """The CPU comparison: ours, ours decode-only, reference; ratios of the medians."""
    cpu = compare(cfg, args.batch, args.repeats, "cpu", args.threads - 1)
    ours = {m: cpu[f"ours_{m}"] for m in ("train", "eval")}
    ref = {m: cpu[f"ref_{m}"] for m in ("train", "eval")}
    decode_only = {m: cpu[f"ours_{m}_decode_only"] for m in ("train", "eval")}
    return {
        "ours_cpu": ours,
        "reference_cpu": ref,
        "ours_cpu_decode_only": decode_only,
        "ratio_cpu_time": {m: ratio(ours[m], ref[m]) for m in ours},
        # the CPU share of the GPU pipeline (reads + decode) / the reference's whole work
        "ratio_cpu_time_decode_only": {m: ratio(decode_only[m], ref[m]) for m in ours},
    }


def report(results: dict) -> None:
    for mode in ("train", "eval"):
        ours, ref = results["ours_cpu"][mode], results["reference_cpu"][mode]
        dec = results["ours_cpu_decode_only"][mode]
        print(
            f"{mode:5s} CPU ms/clip (median): ours {ours['cpu_ms_per_clip']:.2f}  reference "
            f"{ref['cpu_ms_per_clip']:.2f}  ratio {results['ratio_cpu_time'][mode]:.2f} "
            f"(goal <= {GOAL})  | clips/s: ours {ours['clips_per_s']:.1f}  reference "
            f"{ref['clips_per_s']:.1f} | decode-only share {dec['cpu_ms_per_clip']:.2f} ms "
            f"= {results['ratio_cpu_time_decode_only'][mode]:.2f} of the reference"
        )
    print(f"load average during the passes (median): {results['ours_cpu']['train']['load_1min']}")
    if "ours_gpu" in results:
        for mode in ("train", "eval"):
            gpu = results["ours_gpu"][mode]
            print(
                f"{mode:5s} GPU: {gpu['clips_per_s']:.1f} clips/s, "
                f"{gpu['cpu_ms_per_clip']:.2f} CPU ms/clip"
            )
        ratios = results["ratio_cpu_time_gpu_vs_reference_cpu"]
        print(
            f"CPU time per clip, GPU pipeline / reference: train {ratios['train']:.2f}, "
            f"eval {ratios['eval']:.2f}"
        )
        print(f"GPU parity: max |log-mel - kaldi| = {results['gpu_parity_max_abs']:.4f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=96)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="DALI CPU threads; the reference gets threads - 1 DataLoader workers",
    )
    p.add_argument("--repeats", type=int, default=5, help="alternating passes; medians count")
    p.add_argument("--shards", type=Path, help="reuse a shard set made by an earlier run")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "loader.json")
    args = p.parse_args()
    torch.set_num_threads(1)  # the reference's intra-op threads: one, like a DataLoader worker

    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards
        if shards is None:
            t0 = time.perf_counter()
            shards = make_shards(Path(tmp), args.clips)
            print(f"made {args.clips} 10 s clips into shards in {time.perf_counter() - t0:.1f} s")
        cfg = DataConfig(train=str(shards), eval=str(shards), num_threads=args.threads)
        results: dict = {
            "machine": {
                "platform": platform.platform(),
                "cpu_count": os.cpu_count(),
                "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
            },
            "settings": {
                "clips": ShardSet(str(shards)).num_samples,
                "clip_s": 10.0,
                "batch": args.batch,
                "dali_threads": args.threads,
                "reference_workers": args.threads - 1,
                "repeats": args.repeats,
                "target_length": cfg.target_length,
                "mixup": cfg.mixup,
                "freqm": cfg.freqm,
                "timem": cfg.timem,
                # the CPU graph: "fused" (Numba kernel) unless numba is missing ("ops")
                "cpu_framing": "fused" if FeatureSpec().fused("cpu") else "ops",
            },
        }
        results.update(run_cpu(cfg, args))
        if torch.cuda.is_available():
            gpu = compare(cfg, args.batch, args.repeats, "gpu", args.threads - 1)
            results["ours_gpu"] = {m: gpu[f"ours_{m}"] for m in ("train", "eval")}
            results["ratio_cpu_time_gpu_vs_reference_cpu"] = {
                m: ratio(results["ours_gpu"][m], results["reference_cpu"][m])
                for m in ("train", "eval")
            }
            results["gpu_parity_max_abs"] = gpu_parity(shards, args.batch, args.threads)
        results["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]

    report(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Features of a shard set through the DALI pipeline, and its normalisation statistics.

    python -m cmkd_scale.features --shards DIR_OR_MANIFEST --out FILE.npz [--device cpu|gpu]
                                  [--raw] [--target-length N] [--norm-mean M --norm-std S]
    python -m cmkd_scale.features stats --shards DIR_OR_MANIFEST [--target-length N]
                                  [--json FILE]

The first form writes one float32 array (frames x mel bins) per sample key: eval-mode features
(padded/cropped, normalised), or with ``--raw`` the unnormalised log-mel of the whole clip.
``stats`` prints (and optionally writes) the mean/std to use as data.norm_mean/norm_std.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import zipfile
from pathlib import Path

import numpy as np

from cmkd_scale.config import DataConfig
from cmkd_scale.data.eval_loader import EvalLoader
from cmkd_scale.data.manifest import DataError
from cmkd_scale.data.pipeline import FeatureSpec
from cmkd_scale.data.stats import norm_stats
from cmkd_scale.logs import setup_logging

log = logging.getLogger(__name__)

_DEFAULTS = DataConfig()


def extract(
    shards: str,
    out: Path,
    *,
    raw: bool = False,
    device: str = "auto",
    target_length: int = _DEFAULTS.target_length,
    norm_mean: float = _DEFAULTS.norm_mean,
    norm_std: float = _DEFAULTS.norm_std,
    batch: int = 8,
    threads: int = 2,
) -> int:
    """Write the features of every clip of ``shards`` to ``out`` (npz); returns the clip count."""
    spec = FeatureSpec(
        target_length=None if raw else target_length,
        normalize=not raw,
        norm_mean=norm_mean,
        norm_std=norm_std,
    )
    cfg = DataConfig(eval=shards, num_threads=threads, norm_mean=norm_mean, norm_std=norm_std)
    loader = EvalLoader(cfg, micro_batch=batch, rank=0, world_size=1, device=device, spec=spec)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    count = 0
    try:  # streamed into the npz (a zip of .npy members): memory stays at one batch
        with zipfile.ZipFile(partial, "w", allowZip64=True) as archive:
            for key, features in loader.feature_arrays():
                with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, features)
                count += 1
    finally:
        loader.close()
    os.replace(partial, out)  # a finished file or none: never a half-written one
    log.info("wrote %d clips' features to %s", count, out)
    return count


def _parser_extract() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cmkd_scale.features",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--shards", required=True, help="prep output folder, manifest.json or URL")
    p.add_argument("--out", required=True, type=Path, help="output .npz (one array per key)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    p.add_argument(
        "--raw",
        action="store_true",
        help="unnormalised log-mel of the whole clip (no pad/crop, no augmentation)",
    )
    _common(p)
    p.add_argument("--norm-mean", type=float, default=_DEFAULTS.norm_mean)
    p.add_argument("--norm-std", type=float, default=_DEFAULTS.norm_std)
    return p


def _parser_stats() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cmkd_scale.features stats",
        description="mean/std of the raw log-mel after pad/crop",
    )
    p.add_argument("--shards", required=True, help="prep output folder, manifest.json or URL")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    _common(p)
    return p


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target-length", type=int, default=_DEFAULTS.target_length)
    p.add_argument("--batch", type=int, default=8, help="clips per DALI batch")
    p.add_argument("--threads", type=int, default=2, help="DALI CPU threads")


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["stats"]:
            args = _parser_stats().parse_args(argv[1:])
            cfg = DataConfig(target_length=args.target_length, num_threads=args.threads)
            stats = norm_stats(args.shards, cfg, device=args.device, micro_batch=args.batch)
            text = json.dumps(stats, indent=2)
            print(text)
            if args.json:
                args.json.write_text(text + "\n")
            return 0
        args = _parser_extract().parse_args(argv)
        extract(
            args.shards,
            args.out,
            raw=args.raw,
            device=args.device,
            target_length=args.target_length,
            norm_mean=args.norm_mean,
            norm_std=args.norm_std,
            batch=args.batch,
            threads=args.threads,
        )
    except DataError as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

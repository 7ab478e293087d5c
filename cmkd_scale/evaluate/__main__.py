"""Evaluate exported students on the eval shards, scored as AudioSet::

    python -m cmkd_scale.evaluate --checkpoint run/models/best.pt [key=value ...]
    python -m cmkd_scale.evaluate --checkpoint a.pt --checkpoint b.pt     # ensemble
    python -m cmkd_scale.evaluate --wa run/ --wa-start 1 --wa-end 5       # weight averaging
    python -m cmkd_scale.evaluate folds runs/esc50_ast/fold-{1..5} [--metric acc]  # folds

Ensemble = mean of the members' sigmoid outputs (AST's checkpoint ensemble); weight averaging
= mean of the epoch students' weights, then one evaluation (AST / PSLA "WA").
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from cmkd_scale import dist
from cmkd_scale.config import Config, from_dict, load_config, parse_overrides
from cmkd_scale.evaluate.averaging import average_weights, wa_paths
from cmkd_scale.evaluate.scoring import evaluate, save_result
from cmkd_scale.logs import setup_logging
from cmkd_scale.models.exported import Export
from cmkd_scale.models.hf_ast import read_export

log = logging.getLogger(__name__)


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


def _config_with_overrides(export: Export, overrides: list[str]) -> Config:
    """Apply ``overrides`` to the export's training config (in place: its model is built from
    the same tree) and resolve it."""
    tree = export.config
    for key, value in parse_overrides(overrides):
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return from_dict(tree)


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate one export, an ensemble of exports, or a weight average of epoch exports;
    ``folds RUN_DIR ...``: the cross-validation summary of fold runs (folds.py)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["folds"]:
        from cmkd_scale.evaluate.folds import main as folds_main

        return folds_main(argv[1:])
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
            averaged = average_weights(paths)
            name = args.name or f"wa-{start:03d}-{end:03d}"
            out_dir = args.out or args.wa / "eval"
            if env.is_main:
                averaged.save(args.wa / "models" / f"{name}.pt")
            exports = [averaged]
        else:
            # our exports, or transformers AST checkpoints (folder / hf:<id>) with their settings
            exports = [read_export(p) for p in args.checkpoint]
            name = args.name or ("ensemble" if len(exports) > 1 else args.checkpoint[0].stem)
            out_dir = args.out or args.checkpoint[0].resolve().parent.parent / "eval"
        cfg = _config_with_overrides(exports[0], args.overrides)
        models = [export.model(device) for export in exports]

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
            csv_path = save_result(result, out_dir, name, exports[0].class_names)
            log.info("%s: %s (per-class AP: %s)", name, result.summary, csv_path)
            print(json.dumps({"name": name, **result.summary}))
    finally:
        dist.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())

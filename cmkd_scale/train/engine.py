"""DeepSpeed, behind five functions. The only module that imports ``deepspeed``.

The DeepSpeed JSON is generated from the typed Config (never hand-edited) and written to the
run dir; checkpoints are DeepSpeed's own files, but the ``latest`` pointer is written by us,
atomically, after every rank has finished writing (DeepSpeed's own ``latest`` is written by
rank 0 before the others are done, and non-atomically).
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cmkd_scale import dist
from cmkd_scale.config import Config
from cmkd_scale.train.scale import ScalePlan, resolve_scale
from cmkd_scale.train.schedule import make_scheduler

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(cfg: Config) -> str:
    """``deepspeed.precision`` with ``auto`` decided: bf16 on GPU, fp32 on CPU."""
    if cfg.deepspeed.precision != "auto":
        return cfg.deepspeed.precision
    return "bf16" if torch.cuda.is_available() else "fp32"


def compute_dtype(cfg: Config) -> torch.dtype:
    """The dtype DeepSpeed casts the student to (inputs must be cast to it)."""
    return _DTYPES[resolve_precision(cfg)]


def deepspeed_config(
    cfg: Config, *, world_size: int, plan: ScalePlan | None = None
) -> dict[str, Any]:
    """The DeepSpeed JSON for this Config (AST's Adam, ZeRO stage, precision, batch sizes).

    Batch sizes and lr are the plan's (``train/scale.py``), resolved for ``world_size``.
    """
    ds, opt = cfg.deepspeed, cfg.optim
    plan = plan or resolve_scale(cfg, world_size)
    precision = resolve_precision(cfg)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "train_batch_size": plan.global_batch,
        "optimizer": {
            "type": "Adam",
            "params": {
                "lr": plan.lr,
                "betas": list(opt.betas),
                "eps": opt.eps,
                "weight_decay": opt.weight_decay,
                # torch's Adam: no fused-Adam C++ build; L2 weight decay as in AST (not AdamW).
                "torch_adam": True,
                "adam_w_mode": False,
            },
        },
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 1 << 30,  # our loop logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
    # always written: DeepSpeed's own default is 1.0, so leaving the key out would clip every
    # run configured without clipping (0.0 turns it off)
    config["gradient_clipping"] = float(opt.grad_clip)
    return config


def init_distributed(dist_env: dist.DistEnv) -> None:
    """Create the process group (gloo on CPU, nccl on GPU) without DeepSpeed's slow builds."""
    import deepspeed

    # init_distributed would compile a shared-memory op (~130 s) used only for inference
    # all-reduce; `import deepspeed.comm.torch as m` yields torch itself, hence import_module.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(
        dist_backend=backend,
        auto_mpi_discovery=False,
        verbose=False,
        rank=dist_env.rank,
        world_size=dist_env.world_size,
    )


def build_engine(
    cfg: Config,
    model: nn.Module,
    *,
    world_size: int,
    steps_per_epoch: int,
    total_steps: int,
    plan: ScalePlan | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Wrap the student in a DeepSpeed engine with the LR schedule; returns (engine, json)."""
    import deepspeed

    plan = plan or resolve_scale(cfg, world_size)
    ds_json = deepspeed_config(cfg, world_size=world_size, plan=plan)
    optim = plan.optim(cfg.optim)  # the effective lr and warm-up (lr_scaling)

    def scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return make_scheduler(
            optimizer, optim, steps_per_epoch=steps_per_epoch, total_steps=total_steps
        )

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        lr_scheduler=scheduler,
        config=ds_json,
    )
    return engine, ds_json


def save_checkpoint(engine: Any, ckpt_dir: Path, tag: str, client_state: dict[str, Any]) -> None:
    """Write checkpoint ``tag`` on every rank; the caller moves ``latest`` afterwards."""
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)


def load_checkpoint(engine: Any, ckpt_dir: Path, tag: str) -> dict[str, Any]:
    """Restore module, optimizer and LR schedule from ``tag``; returns DeepSpeed's client state."""
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    return client_state or {}


def consolidated_fp32_state_dict(ckpt_dir: Path, tag: str, zero_stage: int) -> dict[str, Any]:
    """The student's full fp32 state dict from a saved checkpoint (any ZeRO stage, CPU tensors)."""
    if zero_stage == 0:
        states = torch.load(
            ckpt_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
        )
        return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag))


def global_grad_norm(engine: Any) -> float:
    """Pre-clip global gradient norm of the last optimizer step (NaN when unknown)."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan")
    return float(norm.item() if isinstance(norm, torch.Tensor) else norm)


def current_lr(engine: Any) -> float:
    return float(engine.get_lr()[0])


def ds_env_defaults() -> None:
    """Environment DeepSpeed reads at import: the CPU accelerator when no GPU is present."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

"""DeepSpeed, behind five functions. The only module that imports ``deepspeed``.

The DeepSpeed JSON is generated from the typed Config (never hand-edited) and written to the
run dir; checkpoints are DeepSpeed's own files, but the ``latest`` pointer is written by us,
atomically, after every rank has finished writing (DeepSpeed's own ``latest`` is written by
rank 0 before the others are done, and non-atomically).

DeepSpeed reads its files with ``torch.load(weights_only=False)``, which runs any code a pickle
names. Every DeepSpeed read here goes through :func:`weights_only_loads`: the weights-only
unpickler with an explicit allow-list of the four DeepSpeed classes its checkpoints hold (loss
scalers, the ZeRO stage enum, fragment addresses); anything else in a file is refused.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import logging
import os
import threading
from collections.abc import Iterator
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


def init_distributed(dist_env: dist.DistEnv, *, collective_timeout_s: float = 1800.0) -> None:
    """Create the process group (gloo on CPU, nccl on GPU) without DeepSpeed's slow builds."""
    import deepspeed

    # init_distributed would compile a shared-memory op (~130 s) used only for inference
    # all-reduce; `import deepspeed.comm.torch as m` yields torch itself, hence import_module.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    # Start-up (rendezvous, DeepSpeed's own groups) may wait for a rank still importing on a
    # busy node: a generous timeout until set_collective_timeout() after the engine is built.
    timeout = datetime.timedelta(seconds=max(collective_timeout_s, _SETUP_TIMEOUT_S))
    _set_default_timeout(timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if dist_env.world_size == 1:
        # One process needs no rendezvous: an in-memory store listens on no port, so runs
        # started side by side cannot collide on one (a port chosen free and then released
        # can be taken by another process's connection before the store binds it).
        torch.distributed.init_process_group(
            backend, store=torch.distributed.HashStore(), rank=0, world_size=1, timeout=timeout
        )
    elif os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and attempt is not None:
        # torchrun serves one store for all its restarts and env:// uses it without a prefix:
        # a restarted rank could read the gloo address a dead rank of the attempt before left
        # there and hang connecting to it. A store prefix per attempt keeps them apart;
        # DeepSpeed then finds the group already made.
        store = torch.distributed.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            dist_env.world_size,
            is_master=False,
            timeout=timeout,
        )
        torch.distributed.init_process_group(
            backend,
            store=torch.distributed.PrefixStore(f"cmkd/attempt_{attempt}", store),
            rank=dist_env.rank,
            world_size=dist_env.world_size,
            timeout=timeout,
        )
    deepspeed.init_distributed(
        dist_backend=backend,
        auto_mpi_discovery=False,
        verbose=False,
        rank=dist_env.rank,
        world_size=dist_env.world_size,
        # a collective that waits longer than this (a hung or stopped rank) raises instead of
        # blocking forever; the launcher then ends the job and restarts it (run.max_restarts)
        timeout=timeout,
    )


_SETUP_TIMEOUT_S = 900.0


def _set_default_timeout(timeout: datetime.timedelta) -> None:
    """The timeout groups created from now on get: DeepSpeed's (ZeRO's data-parallel group)
    come from new_group(), which takes torch's module default, not the world group's."""
    c10d = importlib.import_module("torch.distributed.distributed_c10d")
    c10d.default_pg_timeout = timeout
    if hasattr(c10d, "default_pg_nccl_timeout"):
        c10d.default_pg_nccl_timeout = timeout


def set_collective_timeout(collective_timeout_s: float) -> None:
    """After start-up: every existing group (the world's, DeepSpeed's) and any later one
    raises when a collective waits longer than ``collective_timeout_s`` (a hung rank)."""
    timeout = datetime.timedelta(seconds=collective_timeout_s)
    _set_default_timeout(timeout)
    c10d = importlib.import_module("torch.distributed.distributed_c10d")
    if not c10d.is_initialized():
        return
    for group in list(c10d._world.pg_map):
        c10d.set_timeout(timeout, group)


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
    with weights_only_loads():
        path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    return client_state or {}


def consolidated_fp32_state_dict(ckpt_dir: Path, tag: str, zero_stage: int) -> dict[str, Any]:
    """The student's full fp32 state dict from a saved checkpoint (any ZeRO stage, CPU tensors)."""
    if zero_stage == 0:
        with weights_only_loads():
            states = torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu")
        return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with weights_only_loads():
        return dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag))


def deepspeed_safe_globals() -> list[Any]:
    """The classes DeepSpeed pickles into its checkpoints (ZeRO 0-3, fp32/bf16/fp16)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


_load_lock = threading.Lock()


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Within: every ``torch.load`` (DeepSpeed's own included) is weights-only, allow-listed.

    DeepSpeed passes ``weights_only=False`` itself, so ``torch.load`` is swapped for the
    duration (one loader at a time); a refused file raises ``pickle.UnpicklingError`` naming
    the global it met.
    """
    real_load = torch.load
    allowed = deepspeed_safe_globals()

    def load(f: Any, map_location: Any = None, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(allowed):
            return real_load(f, map_location, *args, **kwargs)

    with _load_lock:
        torch.load = load
        try:
            yield
        finally:
            torch.load = real_load


def step(engine: Any) -> float | None:
    """``engine.step()``; returns the pre-clip gradient norm where DeepSpeed keeps none.

    DeepSpeed's ZeRO and bf16/fp16 optimizers record the global norm; without ZeRO in fp32 the
    engine clips with a norm it discards, so it is computed here first (at the accumulation
    boundary the gradients are already all-reduced: every rank holds the global ones).
    """
    norm = None
    if (
        engine.is_gradient_accumulation_boundary()
        and not engine.zero_optimization()
        and not (engine.fp16_enabled() or engine.bfloat16_enabled())
    ):
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
    engine.step()
    return norm


def global_grad_norm(engine: Any, fallback: float | None = None) -> float:
    """Pre-clip global gradient norm of the last optimizer step (NaN when unknown).

    ``fallback``: the norm :func:`step` returned, for the engines that keep none.
    """
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan") if fallback is None else fallback
    return float(norm.item() if isinstance(norm, torch.Tensor) else norm)


def current_lr(engine: Any) -> float:
    return float(engine.get_lr()[0])


def ds_env_defaults() -> None:
    """Environment DeepSpeed reads at import: the CPU accelerator when no GPU is present."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def estimated_checkpoint_bytes(cfg: Config, model: nn.Module) -> int:
    """One checkpoint's size before the first is measured: the module in its training dtype
    plus Adam's fp32 master weights and two moments (DeepSpeed: 12 bytes per parameter)."""
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    module_bytes = 4 if resolve_precision(cfg) == "fp32" else 2
    return n_params * (module_bytes + 12) + (64 << 10)

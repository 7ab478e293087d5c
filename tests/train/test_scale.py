"""The global batch is the recipe's quantity (train/scale.py).

- The same recipe on 1 rank and on 2 ranks (real trainer, DeepSpeed over gloo): the same global
  batch, clips per optimizer step and learning-rate sequence; the split differs.
- An impossible split is refused by ``python -m cmkd_scale.train`` in about a second, with the
  nearest valid settings, before torch is imported.
- lr_scaling numbers worked out by hand; the derived values reach the tracker's params.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cmkd_scale.config import ConfigError, load_config
from cmkd_scale.train.scale import BatchSplitError, resolve_scale, world_size_from_env
from tests.fixtures.train import ROOT, jsonl, run_cmd, torchrun, train_args, train_env

RECIPES = sorted(
    p
    for p in (ROOT / "configs").glob("*.yaml")
    if p.stem.startswith(("audioset_", "fsd50k_", "esc50_"))
)


def _cfg(*overrides: str):
    return load_config(None, list(overrides))


# ------------------------------------------------------------------ the split, unit level


def test_global_batch_is_split_for_the_world_size() -> None:
    cfg = _cfg("deepspeed.global_batch=12", "deepspeed.micro_batch=12")
    got = {w: resolve_scale(cfg, w) for w in (1, 2, 3, 4, 6, 12)}
    for world, plan in got.items():
        assert plan.global_batch == 12
        assert plan.micro_batch * plan.grad_accum * world == 12
    assert (got[1].micro_batch, got[1].grad_accum) == (12, 1)
    assert (got[4].micro_batch, got[4].grad_accum) == (3, 1)
    # micro_batch is the per-rank cap: 100 clips on 2 ranks with at most 16 per pass -> 10 x 5
    cap = resolve_scale(_cfg("deepspeed.global_batch=100", "deepspeed.micro_batch=16"), 2)
    assert (cap.micro_batch, cap.grad_accum, cap.global_batch) == (10, 5, 100)


def test_explicit_grad_accum_and_global_batch_zero_keep_working() -> None:
    legacy = resolve_scale(_cfg("deepspeed.micro_batch=6", "deepspeed.grad_accum=4"), 8)
    assert (legacy.global_batch, legacy.micro_batch, legacy.grad_accum) == (192, 6, 4)
    assert resolve_scale(_cfg("deepspeed.micro_batch=6"), 2).grad_accum == 1  # 0 -> 1
    explicit = _cfg(
        "deepspeed.global_batch=24", "deepspeed.micro_batch=3", "deepspeed.grad_accum=2"
    )
    assert resolve_scale(explicit, 4).global_batch == 24
    with pytest.raises(BatchSplitError, match=r"= 48, not global_batch 24.*grad_accum=0"):
        resolve_scale(explicit, 8)


def test_impossible_split_names_the_nearest_valid_settings() -> None:
    cfg = load_config(ROOT / "configs" / "audioset_full_cnn.yaml")  # PSLA's 100
    with pytest.raises(BatchSplitError) as info:
        resolve_scale(cfg, 32)
    msg = str(info.value)
    assert "100 clips per optimizer step cannot be split evenly over 32 ranks" in msg
    assert "25 ranks (micro_batch 4 x grad_accum 1)" in msg
    assert "50 ranks (micro_batch 2 x grad_accum 1)" in msg
    assert "deepspeed.global_batch=96 or deepspeed.global_batch=128" in msg


def test_world_size_comes_from_the_launcher_variables() -> None:
    assert world_size_from_env({}) == 1
    assert world_size_from_env({"RANK": "0", "WORLD_SIZE": "8"}) == 8
    assert world_size_from_env({"SLURM_PROCID": "3", "SLURM_NTASKS": "32"}) == 32
    assert world_size_from_env({"WORLD_SIZE": "8"}) == 1  # no RANK: not a torchrun rank


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_states_its_reference_batch(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.deepspeed.global_batch > 0 and cfg.deepspeed.grad_accum == 0
    assert cfg.optim.reference_batch == cfg.deepspeed.global_batch
    plan = resolve_scale(cfg, 1)
    assert plan.warning(cfg.optim) is None and plan.lr == cfg.optim.lr


# ------------------------------------------------------------------ lr scaling by hand


def test_lr_scaling_numbers_by_hand() -> None:
    base = (
        "optim.lr=1e-5",
        "optim.warmup_steps=1000",
        "optim.min_lr=1e-7",
        "optim.reference_batch=12",
        "deepspeed.global_batch=48",
        "deepspeed.micro_batch=6",
    )
    # k = 48 / 12 = 4
    linear = resolve_scale(_cfg(*base, "optim.lr_scaling=linear"), 8)
    assert (linear.micro_batch, linear.grad_accum) == (6, 1)
    assert linear.lr == pytest.approx(4e-5)  # 1e-5 x 4
    assert linear.min_lr == pytest.approx(4e-7)
    assert linear.warmup_steps == 250  # 1000 / 4: the same 12,000 clips of warm-up
    sqrt = resolve_scale(_cfg(*base, "optim.lr_scaling=sqrt"), 8)
    assert sqrt.lr == pytest.approx(2e-5)  # 1e-5 x sqrt(4)
    assert sqrt.warmup_steps == 250
    none = resolve_scale(_cfg(*base), 8)
    assert (none.lr, none.warmup_steps) == (1e-5, 1000)
    # 12 -> 100: k = 25/3; sqrt: x 2.8868; warm-up 1000 / 8.333 = 120 steps
    odd = resolve_scale(_cfg(*base[:4], "deepspeed.global_batch=100", "optim.lr_scaling=sqrt"), 4)
    assert odd.lr == pytest.approx(1e-5 * math.sqrt(100 / 12))
    assert odd.warmup_steps == 120
    # the warning: one line, both numbers
    for plan, cfg in ((linear, _cfg(*base, "optim.lr_scaling=linear")), (none, _cfg(*base))):
        line = plan.warning(cfg.optim)
        assert line and "\n" not in line
        assert "global batch 48 differs from the reference batch 12" in line
    assert "unchanged (optim.lr_scaling=none)" in none.warning(_cfg(*base).optim)
    assert "1e-05 -> 4e-05" in linear.warning(_cfg(*base, "optim.lr_scaling=linear").optim)


def test_scheduler_and_deepspeed_json_use_the_effective_values() -> None:
    import torch

    from cmkd_scale.train.engine import deepspeed_config
    from cmkd_scale.train.schedule import make_scheduler

    cfg = _cfg(
        "optim.lr=1e-3",
        "optim.warmup_steps=8",
        "optim.schedule=constant",
        "optim.reference_batch=4",
        "optim.lr_scaling=linear",
        "deepspeed.global_batch=16",
        "deepspeed.micro_batch=4",
    )
    plan = resolve_scale(cfg, 2)
    ds = deepspeed_config(cfg, world_size=2, plan=plan)
    assert ds["train_batch_size"] == 16
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (4, 2)
    assert ds["optimizer"]["params"]["lr"] == pytest.approx(4e-3)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=plan.lr)
    sched = make_scheduler(opt, plan.optim(cfg.optim), steps_per_epoch=10, total_steps=10)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([2e-3, 4e-3, 4e-3, 4e-3])  # warm-up 8 / 4 = 2 steps


def test_effective_values_reach_the_tracker_params(monkeypatch, tmp_path: Path) -> None:
    from cmkd_scale import dist
    from cmkd_scale.train import run_files
    from cmkd_scale.train.checkpoint import TrainerState

    logged: dict = {}

    class Fake:
        run_id = "r1"

        def log_params(self, params: dict) -> None:
            logged.update(params)

        def log_artifact(self, *_a, **_k) -> None: ...

        def set_tags(self, *_a, **_k) -> None: ...

    monkeypatch.setattr(run_files, "make_tracker", lambda *a, **k: Fake())
    cfg = _cfg("deepspeed.global_batch=12", "deepspeed.micro_batch=12")
    plan = resolve_scale(cfg, 4)
    env = dist.DistEnv(0, 4, 0, "127.0.0.1", 1, "torchrun")
    state = TrainerState(config=cfg.to_dict(), world_size=4)
    run_files.open_tracker(cfg, env, tmp_path, state, resumed_from=None, extra_params=plan.params())
    assert logged["deepspeed.global_batch"] == 12
    assert logged["effective.global_batch"] == 12
    assert (logged["effective.micro_batch"], logged["effective.grad_accum"]) == (3, 1)


# ------------------------------------------------------------------ the command


def test_impossible_split_is_refused_by_the_command_in_about_a_second() -> None:
    env = train_env(RANK="0", WORLD_SIZE="32", LOCAL_RANK="0")
    cmd = [sys.executable, "-m", "cmkd_scale.train", "--config", "configs/audioset_full_ast.yaml"]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "12 clips per optimizer step cannot be split evenly over 32 ranks" in proc.stderr
    assert "12 ranks (micro_batch 1 x grad_accum 1)" in proc.stderr
    assert "deepspeed.global_batch=32 on 32 ranks" in proc.stderr
    assert "torch" not in proc.stderr.lower().replace("torchrun", "")
    assert elapsed < 3.0, elapsed  # ~0.3 s idle; no torch import before the check


def test_plan_prints_the_split_and_the_warning() -> None:
    cmd = [
        sys.executable,
        "-m",
        "cmkd_scale.train",
        "--config",
        "configs/audioset_full_ast.yaml",
        "--plan",
        "--world-size",
        "8",
        "deepspeed.global_batch=96",
        "optim.lr_scaling=linear",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=train_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == (
        "global batch 96 = micro_batch 12 x grad_accum 1 x 8 rank(s); lr 8e-05, warm-up 125 steps"
    )
    assert "global batch 96 differs from the reference batch 12" in lines[1]


# ------------------------------------------------------------------ 1 rank vs 2 ranks

SAME_RECIPE = (
    "teacher=none",
    "run.epochs=2",
    "run.checkpoint_every_steps=0",
    "deepspeed.global_batch=8",
    "deepspeed.micro_batch=4",
    "deepspeed.grad_accum=0",
    "optim.reference_batch=8",
    "optim.warmup_steps=3",
)


@pytest.fixture(scope="module")
def one_and_two_ranks(data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("scale")
    one, two = root / "one", root / "two"
    proc = run_cmd([sys.executable, *train_args(one, data, *SAME_RECIPE)])
    assert proc.returncode == 0, proc.stderr[-6000:]
    torchrun(two, data, *SAME_RECIPE)
    return {"one": one, "two": two, "one_log": proc.stderr}


@pytest.mark.slow
def test_same_recipe_on_one_and_two_ranks(one_and_two_ranks: dict) -> None:
    runs = {name: one_and_two_ranks[name] for name in ("one", "two")}
    ds = {n: json.loads((d / "deepspeed.json").read_text()) for n, d in runs.items()}
    # the split differs, the global batch does not
    assert ds["one"]["train_batch_size"] == ds["two"]["train_batch_size"] == 8
    assert (
        ds["one"]["train_micro_batch_size_per_gpu"],
        ds["one"]["gradient_accumulation_steps"],
    ) == (
        4,
        2,
    )
    assert (
        ds["two"]["train_micro_batch_size_per_gpu"],
        ds["two"]["gradient_accumulation_steps"],
    ) == (
        4,
        1,
    )
    steps = {n: [r for r in jsonl(d / "metrics.jsonl") if "loss" in r] for n, d in runs.items()}
    assert (
        [r["step"] for r in steps["one"]] == [r["step"] for r in steps["two"]] == list(range(1, 9))
    )
    assert [r["clips"] for r in steps["one"]] == [r["clips"] for r in steps["two"]] == [8] * 8
    lr_one = [r["lr"] for r in steps["one"]]
    assert lr_one == pytest.approx([r["lr"] for r in steps["two"]], rel=1e-12)
    assert lr_one[:3] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3])  # debug_cpu: lr 1e-3, warm-up 3
    assert (
        "global batch 8 = micro_batch 4 x grad_accum 2 x 1 rank(s)" in one_and_two_ranks["one_log"]
    )


def test_refusals_are_config_errors() -> None:
    assert issubclass(BatchSplitError, ConfigError)
    with pytest.raises(ConfigError, match=r"deepspeed\.global_batch"):
        _cfg("deepspeed.global_batch=-1")

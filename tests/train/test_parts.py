"""The trainer's parts on their own: LR schedule, generated DeepSpeed JSON, frozen teacher."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from cmkd_scale.config import OptimConfig, TeacherConfig, load_config
from cmkd_scale.distill.teacher import FrozenTeacher, build_teacher
from cmkd_scale.train.engine import deepspeed_config
from cmkd_scale.train.schedule import decay_factor, lr_factor, make_scheduler


def test_step_decay_matches_ast_multisteplr() -> None:
    """AST full AudioSet: MultiStepLR([2,3,4,5], 0.5) stepped after every epoch."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([param], lr=1.0)
    ref = torch.optim.lr_scheduler.MultiStepLR(opt, [2, 3, 4, 5], gamma=0.5)
    cfg = OptimConfig(lr=1.0, decay_start_epoch=2, decay_every_epochs=1, decay_rate=0.5)
    for epoch in range(1, 6):  # AST's ranges stop at epoch 5
        assert decay_factor(cfg, epoch) == pytest.approx(opt.param_groups[0]["lr"]), epoch
        opt.step()
        ref.step()


def test_warmup_then_step_decay_by_optimizer_step() -> None:
    cfg = OptimConfig(lr=1.0, warmup_steps=4, decay_start_epoch=1, decay_every_epochs=2)
    got = [lr_factor(cfg, s, steps_per_epoch=10, total_steps=50) for s in range(50)]
    assert got[:4] == [0.25, 0.5, 0.75, 1.0]
    # milestones at the ends of epochs 1, 3, 5...: epoch 1 full, 2-3 halved, 4-5 quartered
    assert set(got[4:10]) == {1.0} and set(got[10:30]) == {0.5} and set(got[30:50]) == {0.25}


def test_cosine_reaches_min_lr_and_scheduler_follows_the_factor() -> None:
    cfg = OptimConfig(lr=2.0, warmup_steps=2, schedule="cosine", min_lr=0.2)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=cfg.lr)
    sched = make_scheduler(opt, cfg, steps_per_epoch=5, total_steps=12)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1.0) and lrs[2] == pytest.approx(2.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[2:]))
    assert lr_factor(cfg, 12, steps_per_epoch=5, total_steps=12) * cfg.lr == pytest.approx(0.2)
    assert not math.isnan(lrs[-1])


def test_deepspeed_json_comes_from_the_config() -> None:
    cfg = load_config(
        None,
        [
            "deepspeed.zero_stage=3",
            "deepspeed.micro_batch=6",
            "deepspeed.grad_accum=4",
            "deepspeed.precision=bf16",
            "optim.lr=3e-4",
            "optim.grad_clip=1.5",
        ],
    )
    ds = deepspeed_config(cfg, world_size=8)
    assert ds["train_batch_size"] == 6 * 4 * 8
    assert ds["zero_optimization"] == {"stage": 3}
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["gradient_clipping"] == 1.5
    params = ds["optimizer"]["params"]
    assert ds["optimizer"]["type"] == "Adam" and params["lr"] == 3e-4
    assert params["betas"] == [0.95, 0.999] and params["weight_decay"] == 5e-7  # AST's Adam
    assert params["torch_adam"] is True and params["adam_w_mode"] is False  # L2, no C++ build
    # grad_clip=0 means no clipping; DeepSpeed would clip at 1.0 if the key were left out
    assert deepspeed_config(load_config(None, []), world_size=1)["gradient_clipping"] == 0.0


def _teacher(tmp_dtype: str = "fp32") -> FrozenTeacher:
    cfg = TeacherConfig(arch="efficientnet", name="random:efficientnet_b0", dtype=tmp_dtype)
    teacher = build_teacher(
        cfg, num_classes=5, input_tdim=64, input_fdim=64, device=torch.device("cpu")
    )
    assert teacher is not None
    return teacher


def test_teacher_is_frozen_and_stays_in_eval_mode() -> None:
    teacher = _teacher()
    teacher.train()  # what a careless training loop does
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(2, 64, 64, requires_grad=True)
    logits = teacher(x)
    assert logits.shape == (2, 5) and logits.dtype == torch.float32
    assert logits.grad_fn is None and not logits.requires_grad
    (logits.sum() + x.sum()).backward()  # usable as a constant in the student's loss
    assert all(p.grad is None for p in teacher.parameters())
    assert teacher.last_ms > 0
    # eval mode is real: BatchNorm uses running stats, so one clip scores the same alone
    assert torch.allclose(teacher(x[:1]), logits[:1], atol=1e-5)


def test_teacher_keeps_its_own_dtype() -> None:
    teacher = _teacher("bf16")
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    assert teacher(torch.randn(1, 64, 64)).dtype == torch.float32


def test_no_teacher_for_arch_none() -> None:
    none = build_teacher(
        TeacherConfig(), num_classes=3, input_tdim=8, input_fdim=8, device=torch.device("cpu")
    )
    assert none is None

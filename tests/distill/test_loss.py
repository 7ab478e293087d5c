"""The CMKD loss against numbers worked out by hand (τ on the teacher only, no τ² factor)."""

from __future__ import annotations

import math

import pytest
import torch

from cmkd_scale.config import DistillConfig
from cmkd_scale.distill.loss import DistillLoss

LN2, LN3 = math.log(2.0), math.log(3.0)


def test_bce_hand_computed():
    # student z_s = [0, ln 3]       -> sigmoid [1/2, 3/4]
    # teacher z_t = [2 ln 3, -2 ln 3], tau = 2 -> sigmoid(z_t / 2) = [3/4, 1/4]
    # label y = [1, 0]:
    #   BCE(1/2 | 1) = ln 2;  BCE(3/4 | 0) = -ln(1/4) = 2 ln 2       -> mean 1.5 ln 2
    # KD vs soft targets:
    #   -(3/4 ln 1/2 + 1/4 ln 1/2) = ln 2
    #   -(1/4 ln 3/4 + 3/4 ln 1/4) = 2 ln 2 - (1/4) ln 3            -> mean 1.5 ln 2 - ln 3 / 8
    # lambda = 0.25: total = 0.25 * label + 0.75 * kd
    loss = DistillLoss(DistillConfig(lambda_=0.25, temperature=2.0, loss="bce"))
    parts = loss(
        torch.tensor([[0.0, LN3]]),
        torch.tensor([[1.0, 0.0]]),
        torch.tensor([[2 * LN3, -2 * LN3]]),
    )
    label = 1.5 * LN2  # 1.0397207708
    kd = 1.5 * LN2 - LN3 / 8  # 0.9023942347
    assert parts.label.item() == pytest.approx(label, rel=1e-6)
    assert parts.kd.item() == pytest.approx(kd, rel=1e-6)
    assert parts.total.item() == pytest.approx(0.25 * label + 0.75 * kd, rel=1e-6)
    assert parts.total.item() == pytest.approx(0.9367258687, rel=1e-6)


# Two clips, three classes, tau = 2, lambda = 0.5.
#   clip 1: z_s = [ln 2, 0, ln 2] -> softmax q = [2/5, 1/5, 2/5]; true class 1
#   clip 2: z_s = [0, 0, 0]       -> q = [1/3, 1/3, 1/3];        true class 0
#   both:   z_t = [2 ln 2, 0, 0]  -> softmax(z_t / 2) = p = [1/2, 1/4, 1/4]
# CE labels: clip 1 -ln(1/5) = ln 5, clip 2 ln 3                 -> mean (ln 5 + ln 3) / 2
# soft CE -sum p ln q: clip 1 = (3/4) ln(5/2) + (1/4) ln 5, clip 2 = ln 3
# KL = soft CE - H(p), H(p) = (1/2) ln 2 + (1/2) ln 4 = 1.5 ln 2
STUDENT = torch.tensor([[LN2, 0.0, LN2], [0.0, 0.0, 0.0]])
LABELS = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
TEACHER = torch.tensor([[2 * LN2, 0.0, 0.0], [2 * LN2, 0.0, 0.0]])
CE_LABEL = (math.log(5) + LN3) / 2
SOFT_CE = (0.75 * math.log(2.5) + 0.25 * math.log(5) + LN3) / 2
KL = SOFT_CE - 1.5 * LN2


@pytest.mark.parametrize(("kind", "kd"), [("ce", SOFT_CE), ("kl", KL)])
def test_single_label_hand_computed(kind, kd):
    parts = DistillLoss(DistillConfig(lambda_=0.5, temperature=2.0, loss=kind))(
        STUDENT, LABELS, TEACHER
    )
    assert parts.label.item() == pytest.approx(CE_LABEL, rel=1e-6)
    assert parts.kd.item() == pytest.approx(kd, rel=1e-6)
    assert parts.total.item() == pytest.approx(0.5 * CE_LABEL + 0.5 * kd, rel=1e-6)


def test_without_teacher_the_label_loss_is_the_whole_loss():
    parts = DistillLoss(DistillConfig(lambda_=0.3, loss="bce"))(
        torch.tensor([[0.0, LN3]]), torch.tensor([[1.0, 0.0]]), None
    )
    assert parts.total.item() == pytest.approx(1.5 * LN2, rel=1e-6)
    assert parts.kd.item() == 0.0


def test_gradient_reaches_the_student_only():
    student = STUDENT.clone().requires_grad_(True)
    teacher = TEACHER.clone().requires_grad_(True)
    DistillLoss(DistillConfig(loss="kl"))(student, LABELS, teacher).total.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_bf16_logits():
    loss = DistillLoss(DistillConfig(temperature=2.0, loss="bce"))
    parts = loss(
        torch.tensor([[0.0, LN3]], dtype=torch.bfloat16),
        torch.tensor([[1.0, 0.0]]),
        torch.tensor([[2 * LN3, -2 * LN3]], dtype=torch.bfloat16),
    )
    assert parts.total.dtype == torch.bfloat16
    assert parts.total.item() == pytest.approx(
        0.5 * 1.5 * LN2 + 0.5 * (1.5 * LN2 - LN3 / 8), rel=2e-2
    )


def test_shape_mismatch_is_explained():
    loss = DistillLoss(DistillConfig())
    with pytest.raises(ValueError, match="num_classes"):
        loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="teacher logits"):
        loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 5))

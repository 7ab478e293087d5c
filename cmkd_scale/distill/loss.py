"""The CMKD loss: ground-truth loss plus distillation from a frozen teacher's logits.

    total = λ · L_label(ψ(z_s), y) + (1 − λ) · L_kd(ψ(z_s), ψ(z_t / τ))

as written in the CMKD paper (Gong et al., 2022, Sec. 2.4; the YuanGongND/cmkd repository could
not be read from this workplace, so the paper's text is the source):

- τ divides the **teacher** logits only; the student's are used as they are.  Because the
  student is not softened, there is no τ² factor, and λ (0.5 in the paper) is not scaled with τ.
- ψ is the sigmoid for multi-label sets (AudioSet, FSD50K) and the softmax for single-label
  ones (ESC-50).
- ``loss="bce"``: both terms are binary cross-entropy on sigmoids, averaged over batch and
  classes like ``nn.BCEWithLogitsLoss`` (AST's AudioSet loss).  The KD term against the soft
  targets σ(z_t/τ) differs from the per-class Bernoulli KL only by the teacher's entropy, a
  constant for the student, so the gradients equal those of the paper's KL.
- ``loss="ce"``: label term = cross-entropy against the arg-max class of ``labels`` (AST's
  ESC-50 loss); KD term = soft cross-entropy −Σ softmax(z_t/τ) · log_softmax(z_s), batch mean.
- ``loss="kl"``: label term as ``ce``; KD term = KL(softmax(z_t/τ) ‖ softmax(z_s)), batch mean
  (``F.kl_div(..., reduction="batchmean")``); same gradient as ``ce``, zero at a perfect match.

Without a teacher (teacher training, or ``teacher: none``) the loss is the label term alone
(λ is not applied) and ``kd`` is a zero tensor.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from cmkd_scale.config import DistillConfig


class LossParts(NamedTuple):
    total: torch.Tensor
    label: torch.Tensor
    kd: torch.Tensor


class DistillLoss:
    """λ · label loss + (1 − λ) · KD loss, as configured by ``DistillConfig``."""

    def __init__(self, cfg: DistillConfig) -> None:
        self.lambda_ = cfg.lambda_
        self.temperature = cfg.temperature
        self.kind = cfg.loss

    def label_loss(self, student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Ground-truth loss: BCE on multi-hot ``labels`` or CE on their arg-max class."""
        if self.kind == "bce":
            return F.binary_cross_entropy_with_logits(student_logits, labels.to(student_logits))
        return F.cross_entropy(student_logits, labels.argmax(dim=1))

    def kd_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """Distillation loss against the teacher's softened outputs ψ(z_t / τ)."""
        soft = teacher_logits.detach().to(student_logits.dtype) / self.temperature
        if self.kind == "bce":
            return F.binary_cross_entropy_with_logits(student_logits, torch.sigmoid(soft))
        log_student = F.log_softmax(student_logits, dim=1)
        if self.kind == "ce":
            return -(F.softmax(soft, dim=1) * log_student).sum(dim=1).mean()
        return F.kl_div(
            log_student, F.log_softmax(soft, dim=1), reduction="batchmean", log_target=True
        )

    def __call__(
        self,
        student_logits: torch.Tensor,
        labels: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
    ) -> LossParts:
        if labels.shape != student_logits.shape:
            raise ValueError(
                f"labels {tuple(labels.shape)} and student logits {tuple(student_logits.shape)} "
                "differ: the model's num_classes must equal the data's label count"
            )
        label = self.label_loss(student_logits, labels)
        if teacher_logits is None:
            return LossParts(label, label, torch.zeros((), device=label.device, dtype=label.dtype))
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                f"{tuple(student_logits.shape)} differ: teacher and student need the same classes"
            )
        kd = self.kd_loss(student_logits, teacher_logits)
        total = self.lambda_ * label + (1.0 - self.lambda_) * kd
        return LossParts(total, label, kd)

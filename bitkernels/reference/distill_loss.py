"""Logits distillation losses in plain PyTorch: the ground truth of the Triton ops in ``bitkernels.ops.distill_loss``.

Definitions shared with the kernels (read these before using either):

- ``KL_row = KL(softmax(t / tau) || softmax(s / tau))`` summed over the vocabulary, ``t`` the teacher's logits and
  ``s`` the student's; the distillation loss is ``kd = tau**2 * mean(KL_row)`` over the counted tokens.
- Reduction: a per-token mean. The counted tokens are those where ``mask`` is true (``distill_kl``) or whose label is
  not ``ignore_index`` (``fused_linear_distill_loss``: padding is excluded from BOTH the KD and the CE means, which
  share one denominator, the number of counted tokens). With no counted token both losses are 0 (no NaN).
- Gradients reach the student only (its logits; or its hidden states, LM-head weight and bias); the teacher is
  treated as a constant. ``kd`` and ``ce`` returned by ``fused_linear_distill_loss`` are detached reports of the two
  parts; differentiate ``total = alpha_ce * ce + alpha_kd * kd``.

Math runs in float32 (float64 for float64 inputs); these functions materialize the full [tokens, vocab] logits and
are meant for tests, CPUs and small shapes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kl_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/tau) || softmax(s/tau)) per row (no tau**2), in float32/float64; teacher detached."""
    acc = _acc_dtype(student_logits.dtype)
    log_q = F.log_softmax(student_logits.to(acc) / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.detach().to(acc) / temperature, dim=-1)
    # kl_div with log_target computes exp(log_p) * (log_p - log_q): 0 (not NaN) where p underflows to 0.
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """``tau**2 * KL(softmax(t/tau) || softmax(s/tau))``, summed over the last dim, mean over tokens where ``mask``."""
    kl = _kl_rows(student_logits, teacher_logits, temperature)
    if mask is None:
        count = kl.new_tensor(float(max(kl.numel(), 1)))
        return kl.sum() / count * temperature ** 2
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp_min(1) * temperature ** 2


def fused_linear_distill_loss(h_student: torch.Tensor, w_student: torch.Tensor, h_teacher: torch.Tensor,
                              w_teacher: torch.Tensor, labels: torch.Tensor | None = None, temperature: float = 1.0,
                              alpha_kd: float = 1.0, alpha_ce: float = 1.0, ignore_index: int = -100,
                              chunk_size: int | None = None, b_student: torch.Tensor | None = None,
                              b_teacher: torch.Tensor | None = None):
    """-> (total, kd, ce): logits of both LM heads, temperature KL and cross-entropy; see the module docstring.

    ``chunk_size`` is accepted for signature parity with the fused op and ignored: the reference builds all logits.
    """
    del chunk_size
    acc = _acc_dtype(h_student.dtype)
    zs = F.linear(h_student, w_student, b_student).to(acc)
    with torch.no_grad():
        zt = F.linear(h_teacher, w_teacher, b_teacher).to(acc)
    zs = zs.reshape(-1, zs.shape[-1])
    zt = zt.reshape(-1, zt.shape[-1])
    kl = _kl_rows(zs, zt, temperature)
    if labels is None:
        count = kl.new_tensor(float(max(kl.shape[0], 1)))
        kd = kl.sum() / count * temperature ** 2
        ce = kd.new_zeros(())
    else:
        labels = labels.reshape(-1)
        valid = labels != ignore_index
        count = valid.sum().to(kl.dtype).clamp_min(1)
        kd = (kl * valid.to(kl.dtype)).sum() / count * temperature ** 2
        ce = F.cross_entropy(zs, labels, ignore_index=ignore_index, reduction="sum") / count
    total = alpha_ce * ce + alpha_kd * kd
    return total, kd.detach(), ce.detach()

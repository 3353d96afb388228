"""Logits distillation losses: checks the inputs, then runs the Triton op or its PyTorch reference
(``bitkernels.backend``).

Reduction (both ops, both backends): a per-token mean. ``distill_kl`` counts the tokens where ``mask`` is true;
``fused_linear_distill_loss`` counts the tokens whose label is not ``ignore_index``, and those same tokens form BOTH
the KD mean and the CE mean (padding and prompt tokens labelled ``ignore_index`` get neither loss nor gradient).
With ``labels=None`` the KD averages over all tokens and ``ce`` is 0. With no counted token the losses are 0.
"""
from __future__ import annotations

import math

import torch

from .. import reference
from .._validation import check_float, check_min_dim, check_same_device
from ..backend import use_triton
from ._ops import triton_ops


def _check_temperature(temperature) -> None:
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
               mask: torch.Tensor | None = None, *, backend=None) -> torch.Tensor:
    """``tau**2 * KL(softmax(teacher/tau) || softmax(student/tau))`` summed over the vocabulary (last dim), mean over
    the tokens where ``mask`` [...] (bool or 0/1) is true. Logits ``[..., V]``; the gradient reaches the student only.
    """
    check_float("student_logits", student_logits)
    check_float("teacher_logits", teacher_logits)
    check_min_dim("student_logits", student_logits, 1)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape [..., vocab]; if the vocabularies "
                         "differ, distill between models that share one tokenizer")
    _check_temperature(temperature)
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if mask.shape != student_logits.shape[:-1]:
            raise ValueError(f"mask must have the logits' shape without the vocab dim, "
                             f"{tuple(student_logits.shape[:-1])}, got {tuple(mask.shape)}")
    check_same_device(student_logits=student_logits, teacher_logits=teacher_logits, mask=mask)
    if use_triton(backend, student_logits, teacher_logits):
        return triton_ops().distill_kl(student_logits, teacher_logits, temperature, mask)
    return reference.distill_kl(student_logits, teacher_logits, temperature, mask)


def fused_linear_distill_loss(h_student: torch.Tensor, w_student: torch.Tensor, h_teacher: torch.Tensor,
                              w_teacher: torch.Tensor, labels: torch.Tensor | None = None, temperature: float = 1.0,
                              alpha_kd: float = 1.0, alpha_ce: float = 1.0, ignore_index: int = -100,
                              chunk_size: int | None = None, b_student: torch.Tensor | None = None,
                              b_teacher: torch.Tensor | None = None, *, backend=None):
    """LM heads + temperature KD + cross-entropy -> ``(total, kd, ce)``, total = alpha_ce*ce + alpha_kd*kd.

    ``h_student`` [..., H_s] with ``w_student`` [V, H_s]; ``h_teacher`` [..., H_t] (the same tokens) with
    ``w_teacher`` [V, H_t]: hidden sizes may differ, the vocabulary may not. ``labels`` [...] (integer, with
    ``ignore_index`` for tokens that count in neither mean). kd = tau^2 * mean KL(softmax(z_t/tau) || softmax(z_s/tau)).
    Gradients flow to h_student, w_student and b_student; the teacher is a constant. ``kd`` and ``ce`` are detached
    reports: differentiate ``total``. The Triton path walks ``chunk_size`` tokens at a time (default: about 128M
    logits per chunk) and never holds the [tokens, V] logits; its backward may run once per forward.
    """
    for name, t in (("h_student", h_student), ("w_student", w_student), ("h_teacher", h_teacher),
                    ("w_teacher", w_teacher)):
        check_float(name, t)
    check_min_dim("h_student", h_student, 1)
    check_min_dim("h_teacher", h_teacher, 1)
    for name, w in (("w_student", w_student), ("w_teacher", w_teacher)):
        if w.dim() != 2:
            raise ValueError(f"{name} must be an LM-head weight [vocab, hidden], got shape {tuple(w.shape)}")
    if w_student.shape[0] != w_teacher.shape[0]:
        raise ValueError(f"vocab mismatch: the student's LM head has {w_student.shape[0]} rows and the teacher's "
                         f"{w_teacher.shape[0]}; logits distillation needs one vocabulary (models sharing a tokenizer; "
                         "slice padded LM-head rows to the real vocabulary first)")
    for who, h, w in (("student", h_student, w_student), ("teacher", h_teacher, w_teacher)):
        if h.shape[-1] != w.shape[1]:
            raise ValueError(f"h_{who} has hidden size {h.shape[-1]} but w_{who} is {tuple(w.shape)}: "
                             f"w_{who} must be [vocab, {h.shape[-1]}]")
        if h.dtype != w.dtype:
            raise TypeError(f"h_{who} ({h.dtype}) and w_{who} ({w.dtype}) must share a dtype; cast one of them")
    if h_student.shape[:-1].numel() != h_teacher.shape[:-1].numel():
        raise ValueError(f"h_student {tuple(h_student.shape)} and h_teacher {tuple(h_teacher.shape)} must hold the "
                         "same number of tokens (leading dims)")
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor (token ids, {ignore_index} to ignore), got "
                            f"{labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__}")
        if labels.shape != h_student.shape[:-1]:
            raise ValueError(f"labels must have h_student's shape without the hidden dim, "
                             f"{tuple(h_student.shape[:-1])}, got {tuple(labels.shape)}")
        vocab = w_student.shape[0]
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            raise ValueError(f"labels hold ids outside [0, {vocab}) other than ignore_index={ignore_index}: "
                             f"e.g. {labels[bad].flatten()[:5].tolist()}")
    for name, b, w in (("b_student", b_student, w_student), ("b_teacher", b_teacher, w_teacher)):
        if b is not None:
            check_float(name, b)
            if b.shape != (w.shape[0],):
                raise ValueError(f"{name} must have shape ({w.shape[0]},), got {tuple(b.shape)}")
    _check_temperature(temperature)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int (tokens per chunk) or None, got {chunk_size!r}")
    check_same_device(h_student=h_student, w_student=w_student, h_teacher=h_teacher, w_teacher=w_teacher,
                      labels=labels, b_student=b_student, b_teacher=b_teacher)
    impl = triton_ops() if use_triton(backend, h_student, w_student, h_teacher, w_teacher) else reference
    return impl.fused_linear_distill_loss(h_student, w_student, h_teacher, w_teacher, labels, temperature, alpha_kd,
                                          alpha_ce, ignore_index, chunk_size, b_student, b_teacher)

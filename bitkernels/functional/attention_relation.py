"""Attention-relation distillation loss (MiniLM-v2, BitDistill Stage 3): checks the inputs, then runs the
flash-style Triton op or its PyTorch reference (``bitkernels.backend``)."""
from __future__ import annotations

import torch

from .. import reference
from .._validation import check_float, check_same_device
from ..backend import use_triton
from ._ops import triton_ops


def _layout(name: str, a: torch.Tensor) -> tuple[int, int, int]:
    """(B, L, D) of a [B, L, D] or [B, H, L, d] activation."""
    check_float(name, a)
    if a.dim() == 3:
        return a.shape[0], a.shape[1], a.shape[2]
    if a.dim() == 4:
        return a.shape[0], a.shape[2], a.shape[1] * a.shape[3]
    raise ValueError(f"{name} must be [B, L, D] (tokens x features, e.g. a q_proj output) or [B, H, L, d] "
                     f"(per-head layout, heads are concatenated), got shape {tuple(a.shape)}")


def _check(a_teacher, a_student, num_relation_heads, attention_mask):
    bt, lt, dt = _layout("a_teacher", a_teacher)
    bs, ls, ds = _layout("a_student", a_student)
    if (bt, lt) != (bs, ls):
        raise ValueError(f"teacher and student must cover the same batch and positions: teacher has B={bt}, L={lt}, "
                         f"student B={bs}, L={ls}")
    if isinstance(num_relation_heads, bool) or not isinstance(num_relation_heads, int) or num_relation_heads < 1:
        raise ValueError(f"num_relation_heads must be a positive int, got {num_relation_heads!r}")
    for name, d in (("teacher", dt), ("student", ds)):
        if d % num_relation_heads:
            raise ValueError(f"the {name} width D={d} is not divisible by num_relation_heads={num_relation_heads}; "
                             f"pick a common divisor of the teacher and student widths ({dt} and {ds})")
    check_same_device(a_teacher=a_teacher, a_student=a_student, attention_mask=attention_mask)
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2 \
                or tuple(attention_mask.shape) != (bs, ls):
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
            raise ValueError(f"attention_mask must be a [B, L] = [{bs}, {ls}] tensor with 1 for real tokens and 0 for "
                             f"padding, got {shape}")


def attention_relation_kl(a_teacher: torch.Tensor, a_student: torch.Tensor, num_relation_heads: int,
                          attention_mask: torch.Tensor | None = None, causal: bool = False, *,
                          backend: str | None = None) -> torch.Tensor:
    """MiniLM-v2 relation loss of one activation (Q, K or V of the distilled layer): a float32 scalar.

    Layouts: ``a_teacher`` [B, L, D_t] and ``a_student`` [B, L, D_s] (projection outputs, tokens x features), or
    [B, H, L, d] per-head tensors (heads concatenated into D = H * d first; K/V with fewer, GQA heads are fine). Each
    side's width is split into ``num_relation_heads`` = R heads of d_t = D_t / R and d_s = D_s / R; per head,
    ``P = softmax(A_h A_h^T / sqrt(d))`` and the loss is ``KL(P_teacher || P_student)``.

    Normalization: KL summed over keys, then averaged over the real queries of the whole batch and the R heads:
    ``sum_{b,r,i real} KL_{b,r,i} / (R * N_real)`` with ``N_real = attention_mask.sum()`` (B * L without a mask),
    i.e. ``1 / (B * R * L)`` unpadded. ``attention_mask`` [B, L] (1 = real token): padded positions are neither
    queries nor keys. ``causal=True``: query i sees keys j <= i. The teacher is detached; the gradient flows to
    ``a_student`` only. No L x L tensor is formed on the Triton path (memory O(B * R * L)).
    """
    _check(a_teacher, a_student, num_relation_heads, attention_mask)
    impl = triton_ops() if use_triton(backend, a_teacher, a_student) else reference
    return impl.attention_relation_kl(a_teacher, a_student, num_relation_heads, attention_mask, causal)


def attention_relation_distill_loss(qkv_teacher, qkv_student, num_relation_heads: int,
                                    attention_mask: torch.Tensor | None = None, causal: bool = False, *,
                                    backend: str | None = None) -> torch.Tensor:
    """BitDistill's L_AD: mean of ``attention_relation_kl`` over the Q, K and V relations.

    ``qkv_teacher`` and ``qkv_student`` are (q, k, v) sequences of activations in the layouts of
    ``attention_relation_kl`` (teacher and student may differ in width and head count; R must divide every width).
    """
    if len(qkv_teacher) != len(qkv_student) or len(qkv_student) == 0:
        raise ValueError(f"qkv_teacher and qkv_student must be equal-length, non-empty sequences (q, k, v), got "
                         f"{len(qkv_teacher)} and {len(qkv_student)} tensors")
    for t, s in zip(qkv_teacher, qkv_student):
        _check(t, s, num_relation_heads, attention_mask)
    tensors = [*qkv_teacher, *qkv_student]
    impl = triton_ops() if use_triton(backend, *tensors) else reference
    return impl.attention_relation_distill_loss(qkv_teacher, qkv_student, num_relation_heads, attention_mask, causal)

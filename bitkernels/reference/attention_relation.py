"""Attention-relation distillation loss (MiniLM-v2, BitDistill Stage 3), pure PyTorch.

For one activation A of teacher and student (the Q, K or V projection output of the distilled layer), the hidden
dimension is split into R relation heads; each head gives a relation ``P = softmax(A_h A_h^T / sqrt(d_r))`` over the
L positions, and the loss is ``KL(P_teacher || P_student)``. The teacher and student widths may differ (d_r = D / R on
each side): only R must match.

Normalization (shared bit for bit in meaning with the Triton op): the KL of a query row is summed over its keys; rows
are then averaged over every real query of the batch and over the R heads,

    loss = sum_{b, r, i real} KL_{b,r,i} / (R * N_real),   N_real = attention_mask.sum() (B * L without a mask),

i.e. 1 / (B * R * L) without padding, and a token-weighted mean over real queries with padding. Padded positions
(mask 0) are neither queries nor keys. ``causal=True`` lets query i see keys j <= i only. A batch with no real query
gives loss 0. The loss is float32 (float64 for float64 inputs); the teacher is detached.

This materializes B * R * L * L probabilities: it is the ground truth of the tests and the CPU fallback, not a
training path at long L (see ``bitkernels.ops.attention_relation``).
"""
from __future__ import annotations

import math

import torch

from .._base import as_tokens_by_features


def _relation_logits(a: torch.Tensor, num_relation_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, L, D] -> scaled relation logits [B, R, L, L] in ``dtype``."""
    b, l, d = a.shape
    d_r = d // num_relation_heads
    heads = a.to(dtype).reshape(b, l, num_relation_heads, d_r).transpose(1, 2)  # [B, R, L, d_r]
    return heads @ heads.transpose(-1, -2) / math.sqrt(d_r)


def attention_relation_kl(a_teacher: torch.Tensor, a_student: torch.Tensor, num_relation_heads: int,
                          attention_mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    """Scalar ``KL(softmax(T_h T_h^T / sqrt(d_t)) || softmax(S_h S_h^T / sqrt(d_s)))``, normalized as the module
    docstring says. ``a_teacher`` [B, L, D_t] or [B, H_t, L, d_t]; ``a_student`` likewise with its own width."""
    t = as_tokens_by_features(a_teacher).detach()
    s = as_tokens_by_features(a_student)
    batch, length = s.shape[0], s.shape[1]
    work = torch.float64 if torch.float64 in (t.dtype, s.dtype) else torch.float32
    zt = _relation_logits(t, num_relation_heads, work)
    zs = _relation_logits(s, num_relation_heads, work)
    keep = torch.ones(batch, 1, length, length, dtype=torch.bool, device=s.device)
    if attention_mask is not None:
        real = attention_mask.to(s.device) != 0                           # [B, L]
        keep = keep & real[:, None, None, :]
    else:
        real = torch.ones(batch, length, dtype=torch.bool, device=s.device)
    if causal:
        keep = keep & torch.ones(length, length, dtype=torch.bool, device=s.device).tril()
    # A padded query may see no key at all (causal + left padding): give its row every key so the softmax stays
    # finite; the row is dropped below and gets zero gradient.
    keep = keep | ~real[:, None, :, None]
    log_pt = torch.log_softmax(zt.masked_fill(~keep, float("-inf")), dim=-1)
    log_ps = torch.log_softmax(zs.masked_fill(~keep, float("-inf")), dim=-1)
    kl_terms = torch.where(keep, log_pt.exp() * (log_pt - log_ps), torch.zeros((), dtype=work, device=s.device))
    kl_rows = torch.where(real[:, None, :], kl_terms.sum(-1), torch.zeros((), dtype=work, device=s.device))
    num_real = real.sum().clamp_min(1).to(work)
    return kl_rows.sum() / (num_relation_heads * num_real)


def attention_relation_distill_loss(qkv_teacher, qkv_student, num_relation_heads: int,
                                    attention_mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    """Mean of ``attention_relation_kl`` over the (Q, K, V) relations: ``qkv_*`` are 3-sequences of activations."""
    losses = [attention_relation_kl(t, s, num_relation_heads, attention_mask, causal)
              for t, s in zip(qkv_teacher, qkv_student)]
    return sum(losses) / len(losses)

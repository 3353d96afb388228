"""Quantization ops: checks the inputs, then runs the Triton op or its PyTorch reference (``bitkernels.backend``)."""
from __future__ import annotations

import torch

from .. import reference
from .._base import ACT_EPS, WEIGHT_EPS
from .._validation import check_float, check_min_dim, check_norm_weight
from ..backend import use_triton
from ._ops import triton_ops


def _check_weight(w: torch.Tensor, per_channel: bool) -> None:
    check_float("w", w)
    if per_channel and w.dim() != 2:
        raise ValueError(f"per_channel ternarization needs a 2-D weight [out, in], got shape {tuple(w.shape)}")


def ternarize_absmean(w: torch.Tensor, per_channel: bool = False, eps: float = WEIGHT_EPS, *, backend=None):
    """Ternary weights: -> (int8 codes in {-1, 0, 1}, float32 scale ``mean|w|``, shape [] or [out] if per_channel)."""
    _check_weight(w, per_channel)
    impl = triton_ops() if use_triton(backend, w) else reference
    return impl.ternarize_absmean(w, per_channel, eps)


def quantize_activations_int8(x: torch.Tensor, eps: float = ACT_EPS, *, backend=None):
    """Per-token int8: ``x`` [..., K] -> (int8 codes [..., K], float32 scale [...] = absmax/127)."""
    check_float("x", x)
    check_min_dim("x", x, 1)
    impl = triton_ops() if use_triton(backend, x) else reference
    return impl.quantize_activations_int8(x, eps)


def rmsnorm_quantize_int8(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, act_eps: float = ACT_EPS, *,
                          backend=None):
    """SubLN RMSNorm fused with per-token int8 quantization: -> (int8 codes [..., K], float32 scale [...])."""
    check_float("x", x)
    check_min_dim("x", x, 1)
    check_norm_weight(x, weight)
    impl = triton_ops() if use_triton(backend, x, weight) else reference
    return impl.rmsnorm_quantize_int8(x, weight, eps, act_eps)


def fake_quantize_weight(w: torch.Tensor, per_channel: bool = False, eps: float = WEIGHT_EPS, *, backend=None):
    """``codes * scale`` in ``w``'s dtype; gradient of identity (straight-through estimator)."""
    _check_weight(w, per_channel)
    impl = triton_ops() if use_triton(backend, w) else reference
    return impl.fake_quantize_weight(w, per_channel, eps)


def fake_quantize_activations(x: torch.Tensor, eps: float = ACT_EPS, *, backend=None):
    """Per-token int8 fake quantization in ``x``'s dtype; gradient of identity (straight-through estimator)."""
    check_float("x", x)
    check_min_dim("x", x, 1)
    impl = triton_ops() if use_triton(backend, x) else reference
    return impl.fake_quantize_activations(x, eps)


def rmsnorm_fake_quantize(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, act_eps: float = ACT_EPS, *,
                          backend=None):
    """RMSNorm then int8 fake quantization in one pass; gradients of the RMSNorm (quantization is straight-through)."""
    check_float("x", x)
    check_min_dim("x", x, 1)
    check_norm_weight(x, weight)
    impl = triton_ops() if use_triton(backend, x, weight) else reference
    return impl.rmsnorm_fake_quantize(x, weight, eps, act_eps)

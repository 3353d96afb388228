"""Pure-PyTorch twins of the quantization kernels in ``bitkernels.ops``, name for name.

They are the ground truth of the tests and the path taken wherever Triton cannot run. Every quantity is computed in
float32 with the same operation order as the kernels, so codes match exactly wherever the scale is order-independent
(absmax); where a sum is involved (absmean, RMS) the kernels may differ in the last bit of the scale.

Rounding rule: round half to even (``torch.round``), mirrored in the kernels.
Scales: weight codes dequantize as ``codes * scale`` with ``scale = max(mean|W|, eps)``; activation codes as
``codes * scale`` with ``scale = max(absmax, eps) * (1/127)``. Division is done as a multiplication by the IEEE
reciprocal (``round(w * (1/s))``, ``round(x * (127 * (1/a)))``), which is what torch's scalar division does on the
CPU and what the kernels do with ``div_rn``; a direct ``x / a`` would differ in the last bit on rare ties.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._base import ACT_EPS, WEIGHT_EPS  # noqa: F401  (defined once for ops and reference; importable from here)

QMAX = 127


def _straight_through(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    # Forward value is exactly `quantized` (x - x == 0 for finite x); the gradient is that of identity.
    return quantized + (x - x.detach())


def absmean_scale(w: torch.Tensor, per_channel: bool = False, eps: float = WEIGHT_EPS) -> torch.Tensor:
    w32 = w.detach().float()
    s = w32.abs().mean(dim=1) if per_channel else w32.abs().mean()
    return s.clamp_min(eps)


def ternarize_with_scale(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Ternary codes of ``w`` for a given absmean scale (scalar, or one per row)."""
    s = scale.reshape(-1, *([1] * (w.dim() - 1))) if scale.dim() == 1 else scale
    return torch.round(w.detach().float() * s.reciprocal()).clamp_(-1, 1).to(torch.int8)


def ternarize_absmean(w: torch.Tensor, per_channel: bool = False, eps: float = WEIGHT_EPS):
    """``w`` -> (int8 codes in {-1, 0, 1}, float32 scale ``mean|w|``: shape [] or [rows] if ``per_channel``)."""
    scale = absmean_scale(w, per_channel, eps)
    return ternarize_with_scale(w, scale), scale


def quantize_activations_int8(x: torch.Tensor, eps: float = ACT_EPS):
    """Per-token absmax int8: ``x`` [..., K] -> (int8 codes [..., K], float32 scale [...] = absmax / 127)."""
    x32 = x.detach().float()
    absmax = x32.abs().amax(dim=-1, keepdim=True).clamp_min(eps)
    codes = torch.round(x32 * (absmax.reciprocal() * QMAX)).clamp_(-QMAX - 1, QMAX).to(torch.int8)
    return codes, (absmax * (1.0 / QMAX)).squeeze(-1)


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 ``codes`` [M, K] * float32 ``scale`` ([] or one per row [M]), rounded once to ``dtype``."""
    s = scale.float()
    return (codes.float() * (s[:, None] if s.dim() == 1 else s)).to(dtype)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm in float32, returned in float32 (the fused kernels never round the normalized value)."""
    x32 = x.float()
    return x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()


def rmsnorm_quantize_int8(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, act_eps: float = ACT_EPS):
    """SubLN RMSNorm followed by per-token absmax int8: -> (int8 codes, float32 scale [...])."""
    return quantize_activations_int8(rmsnorm(x.detach(), weight.detach(), eps), act_eps)


def ternarize_and_quantize(w: torch.Tensor, x: torch.Tensor, norm_weight: torch.Tensor | None = None,
                           norm_eps: float = 1e-6, act_eps: float = ACT_EPS, weight_eps: float = WEIGHT_EPS):
    """A BitLinear forward's two quantizations (per-tensor weight scale): -> (weight codes, weight scale [], x codes
    [..., K], x scale [...]), with the SubLN RMSNorm before x's when ``norm_weight`` is given."""
    w_codes, w_scale = ternarize_absmean(w, False, weight_eps)
    x_codes, x_scale = (quantize_activations_int8(x, act_eps) if norm_weight is None
                        else rmsnorm_quantize_int8(x, norm_weight, norm_eps, act_eps))
    return w_codes, w_scale, x_codes, x_scale


# Differentiable fake-quantized forms (straight-through estimator): value of the quantized tensor, gradient of
# identity (of the RMSNorm where fused). Outputs take the input's dtype.

def fake_quantize_weight(w: torch.Tensor, per_channel: bool = False, eps: float = WEIGHT_EPS) -> torch.Tensor:
    codes, scale = ternarize_absmean(w, per_channel, eps)
    s = scale.unsqueeze(1) if per_channel else scale
    return _straight_through(w, (codes.float() * s).to(w.dtype))


def fake_quantize_activations(x: torch.Tensor, eps: float = ACT_EPS) -> torch.Tensor:
    codes, scale = quantize_activations_int8(x, eps)
    return _straight_through(x, (codes.float() * scale.unsqueeze(-1)).to(x.dtype))


def rmsnorm_fake_quantize(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                          act_eps: float = ACT_EPS) -> torch.Tensor:
    y = rmsnorm(x, weight, eps)
    codes, scale = quantize_activations_int8(y, act_eps)
    return _straight_through(y, codes.float() * scale.unsqueeze(-1)).to(x.dtype)


def bitlinear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
              norm_weight: torch.Tensor | None = None, norm_eps: float = 1e-6, per_channel: bool = False):
    """BitLinear forward: (SubLN) -> int8 activations -> ternary weights -> matmul, all fake-quantized."""
    xq = fake_quantize_activations(x) if norm_weight is None else rmsnorm_fake_quantize(x, norm_weight, norm_eps)
    wq = fake_quantize_weight(weight, per_channel)
    return F.linear(xq, wq.to(xq.dtype), None if bias is None else bias.to(xq.dtype))

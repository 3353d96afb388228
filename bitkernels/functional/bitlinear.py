"""BitLinear as one functional op."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._validation import check_float, check_same_device
from .quantization import fake_quantize_activations, fake_quantize_weight, rmsnorm_fake_quantize


def bitlinear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
              norm_weight: torch.Tensor | None = None, norm_eps: float = 1e-6, per_channel: bool = False, *,
              backend=None) -> torch.Tensor:
    """BitLinear: (optional SubLN RMSNorm) -> int8 per-token activations x ternary weights, straight-through."""
    check_float("x", x)
    check_float("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x's last dimension ({x.shape[-1] if x.dim() else 'scalar'}) must equal "
                         f"in_features={weight.shape[1]} of weight {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    check_same_device(x=x, weight=weight, bias=bias, norm_weight=norm_weight)
    if norm_weight is None:
        xq = fake_quantize_activations(x, backend=backend)
    else:
        xq = rmsnorm_fake_quantize(x, norm_weight, norm_eps, backend=backend)
    wq = fake_quantize_weight(weight, per_channel, backend=backend)
    return F.linear(xq, wq.to(xq.dtype), None if bias is None else bias.to(xq.dtype))

"""Pure-PyTorch twins of ``bitkernels.ops.int8_matmul`` / ``ops.bitlinear`` (ground truth of tests, CPU fallback)."""
from __future__ import annotations

import torch

from .quantization import ACT_EPS, dequantize_int8, quantize_activations_int8, rmsnorm_quantize_int8


def int8_matmul(a_codes: torch.Tensor, b_codes: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``(a_codes @ b_codes^T) * a_scale[:, None] * b_scale + bias`` in ``out_dtype``; products summed in float64
    (exact, as the kernel's int32 accumulation), scaled in float32 as the kernel's epilogue does."""
    acc = (a_codes.double() @ b_codes.double().t()).float()
    s = b_scale.float()
    y = acc * (a_scale.float()[:, None] * s[None, :]) if s.dim() == 1 else acc * (a_scale.float() * s)[:, None]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def bitlinear_grad_input(grad_y: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """grad_x = grad_y @ (Wq * s), the weight dequantized in grad_y's dtype (the straight-through backward)."""
    return grad_y @ dequantize_int8(w_codes, w_scale, grad_y.dtype)


def bitlinear_grad_weight(grad_y: torch.Tensor, x_deq: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """grad_W = grad_y^T @ (xq * a/127), in ``out_dtype``. (``torch.mm`` rather than ``@``, whose Python wrapper costs
    host time: this is also the Triton path's op.)"""
    return torch.mm(grad_y.t(), x_deq).to(out_dtype)


def bitlinear_inference(x: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor,
                        bias: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
                        norm_eps: float = 1e-6, act_eps: float = ACT_EPS) -> torch.Tensor:
    """Forward only, from frozen int8 weight codes [N, K] and their scale ([] or [N]); no master weight."""
    if norm_weight is None:
        codes, scale = quantize_activations_int8(x, act_eps)
    else:
        codes, scale = rmsnorm_quantize_int8(x, norm_weight, norm_eps, act_eps)
    k = x.shape[-1]
    y = int8_matmul(codes.reshape(-1, k), w_codes, scale.reshape(-1), w_scale, bias, out_dtype=x.dtype)
    return y.reshape(*x.shape[:-1], w_codes.shape[0])

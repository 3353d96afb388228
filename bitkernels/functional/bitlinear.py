"""BitLinear as one functional op: Triton int8 tensor-core path, or the fake-quantized PyTorch reference."""
from __future__ import annotations

import torch

from .. import reference
from .._validation import check_float, check_same_device
from ..backend import use_triton
from ._ops import triton_ops


def _check_linear(x: torch.Tensor, in_features: int, out_features: int, bias, norm_weight, weight_desc: str):
    check_float("x", x)
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x's last dimension ({x.shape[-1] if x.dim() else 'scalar'}) must equal "
                         f"in_features={in_features} of {weight_desc}")
    if bias is not None:
        check_float("bias", bias)
        if bias.shape != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    if norm_weight is not None:
        check_float("norm_weight", norm_weight)
        if norm_weight.shape != (in_features,):
            raise ValueError(f"norm_weight (SubLN) must have shape ({in_features},), got {tuple(norm_weight.shape)}")


def bitlinear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
              norm_weight: torch.Tensor | None = None, norm_eps: float = 1e-6, per_channel: bool = False, *,
              backend=None, weight_cache: dict | None = None, save_input: bool = True) -> torch.Tensor:
    """BitLinear: (optional SubLN RMSNorm) -> int8 per-token activations x ternary absmean weights, straight-through.

    Triton path: int8 x int8 tensor-core GEMM with the scales and bias in its epilogue; backward GEMMs dequantize in
    their loads; saves int8 codes (no SubLN) or x alone (SubLN, ``save_input=True``: exact gradients), or with SubLN and
    ``save_input=False`` the codes alone, rebuilding the normalized input from them (approximate SubLN gradients; see
    ``bitkernels.ops.bitlinear``). ``weight_cache`` (a dict the caller keeps, e.g. per module) reuses the ternary codes
    while ``weight`` is unchanged (its version counter). The reference path fake-quantizes in x's dtype.
    """
    check_float("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    _check_linear(x, weight.shape[1], weight.shape[0], bias, norm_weight, f"weight {tuple(weight.shape)}")
    check_same_device(x=x, weight=weight, bias=bias, norm_weight=norm_weight)
    tensors = [t for t in (x, weight, bias, norm_weight) if t is not None]
    if use_triton(backend, *tensors):
        return triton_ops().bitlinear(x, weight, bias, norm_weight, norm_eps, per_channel, weight_cache=weight_cache,
                                save_input=save_input)
    return reference.bitlinear(x, weight, bias, norm_weight, norm_eps, per_channel)


def bitlinear_inference(x: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor,
                        bias: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
                        norm_eps: float = 1e-6, *, backend=None) -> torch.Tensor:
    """Forward only from frozen ternary codes (int8 [out, in]) and their scale ([] or [out]); no gradients."""
    if w_codes.dtype != torch.int8 or w_codes.dim() != 2:
        raise TypeError(f"w_codes must be a 2-D int8 tensor [out_features, in_features], got "
                        f"{w_codes.dtype} {tuple(w_codes.shape)}")
    if w_scale.dim() > 1 or (w_scale.dim() == 1 and w_scale.shape[0] != w_codes.shape[0]):
        raise ValueError(f"w_scale must be 0-d (per tensor) or ({w_codes.shape[0]},) (per channel), "
                         f"got {tuple(w_scale.shape)}")
    _check_linear(x, w_codes.shape[1], w_codes.shape[0], bias, norm_weight, f"w_codes {tuple(w_codes.shape)}")
    check_same_device(x=x, w_codes=w_codes, w_scale=w_scale, bias=bias, norm_weight=norm_weight)
    tensors = [t for t in (x, bias, norm_weight) if t is not None]
    impl = triton_ops() if use_triton(backend, *tensors) else reference
    return impl.bitlinear_inference(x, w_codes, w_scale, bias, norm_weight, norm_eps)

"""Checked Python entry points of the CPU kernel (kernel.cpp), on torch CPU tensors (no copies when contiguous)."""
from __future__ import annotations

import torch

from . import _build
from .packing import i2_padded_k

ACT_EPS = 1e-5  # bitkernels.reference.quantization.ACT_EPS


def _threads(n_threads: int | None) -> int:
    return int(n_threads) if n_threads else torch.get_num_threads()


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _check_weight(w_packed: torch.Tensor, in_features: int) -> int:
    if w_packed.device.type != "cpu" or w_packed.dtype != torch.uint8 or w_packed.dim() != 2:
        raise ValueError(f"packed weights must be a 2-D uint8 CPU tensor in the i2 layout, got "
                         f"{w_packed.dtype} {tuple(w_packed.shape)} on {w_packed.device}")
    kp = i2_padded_k(in_features)
    if w_packed.shape[1] != kp // 4:
        raise ValueError(f"packed weights for in_features={in_features} must have {kp // 4} bytes a row, got "
                         f"{w_packed.shape[1]}")
    if not w_packed.is_contiguous():
        raise ValueError("packed weights must be contiguous")
    return kp


def ternary_gemm_int32(x_codes: torch.Tensor, w_packed: torch.Tensor, in_features: int,
                       n_threads: int | None = None) -> torch.Tensor:
    """Exact ``x_codes @ codes^T`` in int32: int8 activations [M, K] times i2-packed ternary weights [N, K]."""
    if x_codes.dtype != torch.int8 or x_codes.dim() != 2 or x_codes.device.type != "cpu":
        raise ValueError(f"x_codes must be a 2-D int8 CPU tensor [M, K], got {x_codes.dtype} "
                         f"{tuple(x_codes.shape)} on {x_codes.device}")
    if x_codes.shape[1] != in_features:
        raise ValueError(f"x_codes has {x_codes.shape[1]} columns, the weights {in_features} in_features")
    kp = _check_weight(w_packed, in_features)
    m, n = x_codes.shape[0], w_packed.shape[0]
    xp = torch.zeros(m, kp, dtype=torch.int8)
    xp[:, :in_features] = x_codes
    out = torch.empty(m, n, dtype=torch.int32)
    if m and n:
        _build.load().tk_gemm_i32(xp.data_ptr(), m, kp, w_packed.data_ptr(), n, out.data_ptr(), _threads(n_threads))
    return out


def quantize_activations(x: torch.Tensor, norm_weight: torch.Tensor | None = None, norm_eps: float = 1e-6,
                         act_eps: float = ACT_EPS, n_threads: int | None = None):
    """The kernel's (RMSNorm ->) per-token int8 quantization: float32 [M, K] -> (int8 [M, K], float32 [M])."""
    if x.dtype != torch.float32 or x.dim() != 2:
        raise ValueError(f"x must be a 2-D float32 tensor, got {x.dtype} {tuple(x.shape)}")
    x = x.contiguous()
    m, k = x.shape
    nw = None if norm_weight is None else norm_weight.detach().float().contiguous()
    codes = torch.empty(m, k, dtype=torch.int8)
    scales = torch.empty(m, dtype=torch.float32)
    if m and k:
        _build.load().tk_quantize(x.data_ptr(), m, k, k, _ptr(nw), norm_eps, act_eps, codes.data_ptr(),
                                  scales.data_ptr(), _threads(n_threads))
    return codes, scales


def bitlinear_packed(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor, in_features: int,
                     bias: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
                     norm_eps: float = 1e-6, act_eps: float = ACT_EPS, n_threads: int | None = None) -> torch.Tensor:
    """BitLinear forward through the kernel: x [..., K] (any float dtype; computed in float32) -> [..., N]."""
    if x.shape[-1] != in_features:
        raise ValueError(f"x's last dimension ({x.shape[-1]}) must equal in_features={in_features}")
    kp = _check_weight(w_packed, in_features)
    n = w_packed.shape[0]
    x2 = x.reshape(-1, in_features).to(torch.float32).contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=torch.float32)
    if m and n:
        _build.load().tk_bitlinear_f32(x2.data_ptr(), m, in_features, kp, _ptr(norm_weight), norm_eps, act_eps,
                                       w_packed.data_ptr(), n, w_scale.data_ptr(), int(w_scale.numel() > 1),
                                       _ptr(bias), out.data_ptr(), _threads(n_threads))
    return out.reshape(*x.shape[:-1], n).to(x.dtype)


def head_bf16(x: torch.Tensor, weight: torch.Tensor, n_threads: int | None = None) -> torch.Tensor:
    """``x @ weight^T`` in float32 for a bf16 weight [N, K] (the lm_head at decode); x [..., K] -> float32 [..., N]."""
    if weight.dtype != torch.bfloat16 or weight.dim() != 2 or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous 2-D bfloat16 tensor, got {weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x's last dimension ({x.shape[-1]}) must equal the weight's {k} columns")
    x2 = x.reshape(-1, k).to(torch.float32).contiguous()
    out = torch.empty(x2.shape[0], n, dtype=torch.float32)
    if x2.shape[0] and n:
        _build.load().tk_head_bf16(weight.data_ptr(), n, k, x2.data_ptr(), x2.shape[0], out.data_ptr(),
                                   _threads(n_threads))
    return out.reshape(*x.shape[:-1], n)

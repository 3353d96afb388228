"""Checked Python entry points of the CPU kernel (kernel.cpp, head.cpp), on torch CPU tensors (no copies when
contiguous), and ``PreparedBitLinear``: the same product with its checks done once, for the decode loop."""
from __future__ import annotations

import ctypes

import torch

from bitkernels._base import ACT_EPS  # the training side's epsilon: the same codes for an all-zero row

from . import _build
from .packing import i2_padded_k


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


def _check_f32_vector(t: torch.Tensor | None, n: int, what: str) -> torch.Tensor | None:
    if t is None:
        return None
    if t.dtype != torch.float32 or t.numel() != n or not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError(f"{what} must be a contiguous float32 CPU tensor of {n} values, got {t.dtype} "
                         f"{tuple(t.shape)}")
    return t


def _norm_ms(norm_ms: torch.Tensor | None, m: int) -> torch.Tensor | None:
    # Mean squares from torch (x.pow(2).mean(-1)), one per row: see kernel.cpp quantize_row.
    return None if norm_ms is None else _check_f32_vector(norm_ms.reshape(-1).contiguous(), m, "norm_ms")


def _check_bitlinear_args(w_packed, w_scale, in_features: int, bias, norm_weight):
    """The constant arguments of a packed BitLinear, checked: -> (K_pad, N, float32 scale [1] or [N], bias,
    norm_weight)."""
    kp = _check_weight(w_packed, in_features)
    n = w_packed.shape[0]
    if w_scale.numel() not in (1, n):
        raise ValueError(f"w_scale must have 1 or {n} values, got {w_scale.numel()}")
    scale = _check_f32_vector(w_scale.reshape(-1).contiguous(), w_scale.numel(), "w_scale")
    return kp, n, scale, _check_f32_vector(bias, n, "bias"), _check_f32_vector(norm_weight, in_features, "norm_weight")


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
                         act_eps: float = ACT_EPS, n_threads: int | None = None,
                         norm_ms: torch.Tensor | None = None):
    """The kernel's (RMSNorm ->) per-token int8 quantization: float32 [M, K] -> (int8 [M, K], float32 [M]).
    ``norm_ms`` (the rows' mean squares from ``x.pow(2).mean(-1)``) makes the RMSNorm exactly the reference's."""
    if x.dtype != torch.float32 or x.dim() != 2:
        raise ValueError(f"x must be a 2-D float32 tensor, got {x.dtype} {tuple(x.shape)}")
    x = x.contiguous()
    m, k = x.shape
    nw = None if norm_weight is None else _check_f32_vector(norm_weight.detach().float().contiguous(), k, "norm_weight")
    ms = _norm_ms(norm_ms, m)
    codes = torch.empty(m, k, dtype=torch.int8)
    scales = torch.empty(m, dtype=torch.float32)
    if m and k:
        _build.load().tk_quantize(x.data_ptr(), m, k, k, _ptr(ms), _ptr(nw), norm_eps, act_eps, codes.data_ptr(),
                                  scales.data_ptr(), _threads(n_threads))
    return codes, scales


def bitlinear_packed(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor, in_features: int,
                     bias: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
                     norm_eps: float = 1e-6, act_eps: float = ACT_EPS, n_threads: int | None = None,
                     norm_ms: torch.Tensor | None = None) -> torch.Tensor:
    """BitLinear forward through the kernel: x [..., K] (any float dtype; computed in float32) -> [..., N].
    ``w_scale``: [] / [1] (per tensor) or [N] (per row); ``norm_ms``: see ``quantize_activations``."""
    if x.shape[-1] != in_features:
        raise ValueError(f"x's last dimension ({x.shape[-1]}) must equal in_features={in_features}")
    kp, n, w_scale, bias, norm_weight = _check_bitlinear_args(w_packed, w_scale, in_features, bias, norm_weight)
    x2 = x.reshape(-1, in_features).to(torch.float32).contiguous()
    m = x2.shape[0]
    ms = _norm_ms(norm_ms, m)
    out = torch.empty(m, n, dtype=torch.float32)
    if m and n:
        _build.load().tk_bitlinear_f32(x2.data_ptr(), m, in_features, kp, _ptr(ms), _ptr(norm_weight), norm_eps,
                                       act_eps, w_packed.data_ptr(), n, w_scale.data_ptr(), int(w_scale.numel() > 1),
                                       _ptr(bias), out.data_ptr(), _threads(n_threads))
    return out.reshape(*x.shape[:-1], n).to(x.dtype)


class _LinearDesc(ctypes.Structure):
    """kernel.cpp's TkLinear: the constant arguments of one BitLinear."""
    _fields_ = [("K", ctypes.c_int64), ("K_pad", ctypes.c_int64), ("N", ctypes.c_int64), ("w", ctypes.c_void_p),
                ("w_scale", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("norm_w", ctypes.c_void_p),
                ("norm_eps", ctypes.c_float), ("act_eps", ctypes.c_float), ("w_scale_per_row", ctypes.c_int32),
                ("reserved", ctypes.c_int32)]


class PreparedBitLinear:
    """``bitlinear_packed`` with every check and constant argument done once, for the per-token calls of decode.
    Keeps references to its tensors (so the pointers it hands the kernel stay valid); ``holds`` tells whether it
    was built from these very tensors. Call: x float32 contiguous [..., K] (and, with a SubLN, the rows' mean
    squares ``norm_ms`` [..., 1] from ``x.pow(2).mean(-1, keepdim=True)``) -> float32 [..., N]."""

    def __init__(self, w_packed: torch.Tensor, w_scale: torch.Tensor, in_features: int,
                 bias: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None, norm_eps: float = 1e-6,
                 act_eps: float = ACT_EPS):
        self.tensors = (w_packed, w_scale, bias, norm_weight)
        kp, n, scale, bias, norm_weight = _check_bitlinear_args(w_packed, w_scale, in_features, bias, norm_weight)
        self._keep = (w_packed, scale, bias, norm_weight)
        self.k, self.n, self.subln = in_features, n, norm_weight is not None
        lib = _build.load()
        self._desc = _LinearDesc(in_features, kp, n, w_packed.data_ptr(), scale.data_ptr(), _ptr(bias),
                                 _ptr(norm_weight), norm_eps, act_eps, int(scale.numel() > 1), 0)
        self._addr = ctypes.addressof(self._desc)
        self._fn = lib.tk_linear

    def holds(self, w_packed, w_scale, bias, norm_weight) -> bool:
        t = self.tensors
        return t[0] is w_packed and t[1] is w_scale and t[2] is bias and t[3] is norm_weight

    def __call__(self, x: torch.Tensor, norm_ms: torch.Tensor | None = None,
                 n_threads: int | None = None) -> torch.Tensor:
        k = self.k
        if x.dtype is not torch.float32 or x.shape[-1] != k or not x.is_contiguous():
            raise ValueError(f"x must be contiguous float32 [..., {k}], got {x.dtype} {tuple(x.shape)}")
        m = x.numel() // k
        if self.subln and (norm_ms is None or norm_ms.dtype is not torch.float32 or norm_ms.numel() != m
                           or not norm_ms.is_contiguous()):
            raise ValueError(f"a SubLN product needs norm_ms: {m} contiguous float32 mean squares")
        out = torch.empty((*x.shape[:-1], self.n), dtype=torch.float32)
        if m:
            self._fn(self._addr, x.data_ptr(), m, norm_ms.data_ptr() if self.subln else None, out.data_ptr(),
                     n_threads or torch.get_num_threads())
        return out


def head_gemv(x: torch.Tensor, weight: torch.Tensor, n_threads: int | None = None) -> torch.Tensor:
    """``x @ weight^T`` in float32 for a float32 or bf16 weight [N, K] (the lm_head at decode; see head.cpp);
    x [..., K] -> float32 [..., N]."""
    if weight.dtype not in (torch.float32, torch.bfloat16) or weight.dim() != 2 or not weight.is_contiguous() \
            or weight.device.type != "cpu":
        raise ValueError(f"weight must be a contiguous 2-D float32 or bfloat16 CPU tensor, got {weight.dtype} "
                         f"{tuple(weight.shape)} on {weight.device}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x's last dimension ({x.shape[-1]}) must equal the weight's {k} columns")
    x2 = x.reshape(-1, k).to(torch.float32).contiguous()
    out = torch.empty(x2.shape[0], n, dtype=torch.float32)
    if x2.shape[0] and n:
        lib = _build.load()
        fn = lib.tk_head_f32 if weight.dtype == torch.float32 else lib.tk_head_bf16
        fn(weight.data_ptr(), n, k, x2.data_ptr(), x2.shape[0], out.data_ptr(), _threads(n_threads))
    return out.reshape(*x.shape[:-1], n)

"""Python side of layer.cpp: the decode step's residual add + RMSNorm, q/k norm + RoPE + KV-cache write + attention,
and SwiGLU as single C calls (see layer.cpp for the numerics). Checked functions for tests and direct use; the
decode loop (``cpu_ref.decoder``) calls the library with pointers it validated once."""
from __future__ import annotations

import ctypes

import torch

from . import _build

DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


class AttnDesc(ctypes.Structure):
    """layer.cpp's TkAttn: one layer's attention constants."""
    _fields_ = [("dtype", ctypes.c_int32), ("hq", ctypes.c_int32), ("hk", ctypes.c_int32), ("d", ctypes.c_int32),
                ("q_norm_w", ctypes.c_void_p), ("k_norm_w", ctypes.c_void_p), ("norm_eps", ctypes.c_float),
                ("scale", ctypes.c_float), ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p),
                ("max_len", ctypes.c_int64)]


def available() -> bool:
    """The library has the vectorized (AVX-512 or AVX2) layer ops; elsewhere the decode loop keeps torch ops."""
    return bool(_build.load().tk_layer_vectorized())


def _check(t: torch.Tensor, dtype: torch.dtype, numel: int, what: str) -> torch.Tensor:
    if t.dtype != dtype or t.numel() != numel or not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError(f"{what} must be a contiguous {dtype} CPU tensor of {numel} values, got {t.dtype} "
                         f"{tuple(t.shape)}")
    return t


def _dtype(t: torch.Tensor) -> int:
    if t.dtype not in DTYPES:
        raise ValueError(f"layer ops take float32, bfloat16 or float16 activations, got {t.dtype}")
    if not available():
        raise RuntimeError("the layer ops need an AVX-512 or AVX2 build of the kernel (see cpu_ref/layer.cpp)")
    return DTYPES[t.dtype]


def add_rmsnorm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """In place ``h += delta`` (if given), then HF's RMSNorm of h: returns ``weight * (h * rsqrt(mean(h^2) + eps))``
    with HF's rounding points in h's dtype. One row (h: n values, n % 16 == 0)."""
    dt, n = _dtype(h), h.numel()
    if n % 16:
        raise ValueError(f"the row length must be a multiple of 16, got {n}")
    _check(h, h.dtype, n, "h")
    if delta is not None:
        _check(delta, h.dtype, n, "delta")
    _check(weight, h.dtype, n, "weight")
    out = torch.empty_like(h)
    _build.load().tk_add_rmsnorm(dt, h.data_ptr(), None if delta is None else delta.data_ptr(), weight.data_ptr(),
                                 eps, n, out.data_ptr())
    return out


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """[gate | up] (2 n values, n % 16 == 0) -> silu(gate) * up, rounded as HF's ``act_fn(gate) * up``."""
    dt, n = _dtype(gate_up), gate_up.numel() // 2
    if gate_up.numel() % 32:
        raise ValueError(f"gate_up must hold 2 n values with n % 16 == 0, got {gate_up.numel()}")
    _check(gate_up, gate_up.dtype, 2 * n, "gate_up")
    out = torch.empty(n, dtype=gate_up.dtype)
    _build.load().tk_swiglu(dt, gate_up.data_ptr(), gate_up.data_ptr() + n * gate_up.element_size(), n,
                            out.data_ptr())
    return out


def make_attn_desc(dtype: torch.dtype, hq: int, hk: int, d: int, q_norm_w: torch.Tensor | None,
                   k_norm_w: torch.Tensor | None, norm_eps: float, scale: float, k_cache: torch.Tensor,
                   v_cache: torch.Tensor) -> AttnDesc:
    """Checked descriptor of one layer's attention; the caches are [hk, max_len, d] (any leading 1s) and must
    outlive it."""
    if dtype not in DTYPES:
        raise ValueError(f"unsupported activation dtype {dtype}")
    if d % 32 or d > 256 or hq % hk:
        raise ValueError(f"head_dim must be a multiple of 32 and <= 256 and q heads a multiple of kv heads, got "
                         f"head_dim={d}, heads {hq}/{hk}")
    max_len = k_cache.shape[-2]
    for c, what in ((k_cache, "k_cache"), (v_cache, "v_cache")):
        _check(c, dtype, hk * max_len * d, what)
        if c.shape[-1] != d:
            raise ValueError(f"{what} must be [kv_heads, max_len, head_dim], got {tuple(c.shape)}")
    for w in (q_norm_w, k_norm_w):
        if w is not None:
            _check(w, dtype, d, "q/k norm weight")
    return AttnDesc(DTYPES[dtype], hq, hk, d, None if q_norm_w is None else q_norm_w.data_ptr(),
                    None if k_norm_w is None else k_norm_w.data_ptr(), norm_eps, scale, k_cache.data_ptr(),
                    v_cache.data_ptr(), max_len)


def attn_decode(desc: AttnDesc, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: int,
                n_threads: int | None = None) -> torch.Tensor:
    """One token's attention: q/k norm + RoPE (cos/sin: [head_dim] at ``pos``), k and v written to the caches at
    ``pos``, softmax attention of each query head over positions 0..pos.
    qkv: [(hq + 2 hk) head_dim] -> [hq head_dim]."""
    dtype = qkv.dtype
    if DTYPES.get(dtype) != desc.dtype:
        raise ValueError(f"qkv is {dtype}, the descriptor was made for dtype code {desc.dtype}")
    _check(qkv, dtype, (desc.hq + 2 * desc.hk) * desc.d, "qkv")
    _check(cos, dtype, desc.d, "cos")
    _check(sin, dtype, desc.d, "sin")
    if not 0 <= pos < desc.max_len:
        raise ValueError(f"pos {pos} outside the cache's {desc.max_len} positions")
    _dtype(qkv)
    out = torch.empty(desc.hq * desc.d, dtype=dtype)
    q, es = qkv.data_ptr(), qkv.element_size()
    k = q + desc.hq * desc.d * es
    _build.load().tk_attn_decode(ctypes.addressof(desc), q, k, k + desc.hk * desc.d * es, cos.data_ptr(),
                                 sin.data_ptr(), pos, out.data_ptr(), n_threads or torch.get_num_threads())
    return out

"""The forward GEMM of BitLinear.

``int8_matmul`` multiplies int8 activation codes [M, K] by int8 ternary weight codes [N, K] on the integer tensor
cores (int32 accumulation, exact for K < 2**17) and applies the per-token scale, the weight scale (per tensor or per
output channel) and the bias in the epilogue: one rounding to the output dtype, no int32 tensor in HBM. The backward
GEMMs (float gradients times dequantized codes) run on cuBLAS: see ``ops.bitlinear``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import triton_interpreter_enabled
from ._common import AUTOTUNE, cast_to, on_device


def _configs(hopper_like: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    if triton_interpreter_enabled():  # the interpreter runs every config it is given: one small one keeps CPU tests fast
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
               for bm, bn, bk, w, s in hopper_like]
    return configs if AUTOTUNE else configs[:1]  # the first is the untuned default (fits Hopper and Ampere)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Hopper: 128x256 / 256x128 tiles with 8 warps (two warpgroups
# of wgmma) and 3-4 stages fit its 227 KB of shared memory; 128x128 and 64-row tiles for small M or N and for Ampere
# (whose 164 KB rejects the deepest int8 configs at compile time, which the autotuner skips).
_INT8_CONFIGS = _configs([
    (128, 256, 128, 8, 3), (256, 128, 128, 8, 3), (128, 128, 128, 8, 4), (128, 128, 128, 4, 4),
    (128, 256, 64, 8, 4), (64, 128, 128, 4, 4), (64, 256, 128, 4, 3), (128, 64, 128, 4, 4),
])


def _bucket(m: int) -> int:
    """Autotuning key for M: the next power of two, so a new batch size reuses its bucket's tuning."""
    return triton.next_power_of_2(max(m, 1))


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped ordering: GROUP_M row-tiles share each column tile while it is in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % group) % group_m, (pid % group) // group_m


@triton.autotune(configs=_INT8_CONFIGS, key=["M_KEY", "N", "K", "PER_CHANNEL", "HAS_BIAS"])
@triton.jit
def _int8_matmul_kernel(a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, M, N, K, M_KEY,
                        stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
                        PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Out-of-range rows/columns are clamped instead of masked: their (valid) loads feed only results that are never
    # stored, and the main loop then masks along K alone.
    rm = tl.where(offs_m < M, offs_m, 0).to(tl.int64)
    rn = tl.where(offs_n < N, offs_n, 0).to(tl.int64)
    a_ptrs = a_ptr + rm[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + rn[None, :] * stride_bn + offs_k[:, None] * stride_bk  # [BLOCK_K, BLOCK_N] view of W [N, K]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    # Epilogue: int32 -> fp32 (exact below 2**24, i.e. |sum| < 127 * K for K < 132k), both scales, bias, one rounding.
    a_scale = tl.load(a_scale_ptr + rm)
    if PER_CHANNEL:
        b_scale = tl.load(b_scale_ptr + rn)
        y = acc.to(tl.float32) * a_scale[:, None] * b_scale[None, :]
    else:
        y = acc.to(tl.float32) * (a_scale * tl.load(b_scale_ptr))[:, None]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn
    tl.store(c_ptrs, cast_to(y, c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def int8_matmul(a_codes: torch.Tensor, b_codes: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``(a_codes @ b_codes^T) * a_scale[:, None] * b_scale + bias`` in ``out_dtype``.

    a_codes int8 [M, K] (activation codes), b_codes int8 [N, K] (weight codes, nn.Linear layout), a_scale fp32 [M],
    b_scale fp32 [] (per tensor) or [N] (per output channel), bias [N] or None.
    """
    m, k = a_codes.shape
    n = b_codes.shape[0]
    out = torch.empty((m, n), device=a_codes.device, dtype=out_dtype)
    if m == 0 or n == 0:
        return out
    if k == 0:
        out.zero_()
        return out if bias is None else out.add_(bias.to(out_dtype))
    a_scale = a_scale.float().contiguous()
    b_scale = b_scale.float().contiguous()
    per_channel = b_scale.dim() == 1
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    with on_device(a_codes):
        _int8_matmul_kernel[grid](
            a_codes, b_codes, out, a_scale, b_scale, bias if bias is not None else b_scale, m, n, k, _bucket(m),
            a_codes.stride(0), a_codes.stride(1), b_codes.stride(0), b_codes.stride(1), out.stride(0), out.stride(1),
            PER_CHANNEL=per_channel, HAS_BIAS=bias is not None)
    return out

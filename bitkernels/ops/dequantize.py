"""int8 codes -> floats (codes * scale, one scale per row or one for all), for the BitLinear backward GEMMs.

The backward GEMMs run on cuBLAS over these dequantized copies: one memory-bound pass (1 byte read, 2 written per
element) costs a few percent of the GEMM it feeds, while dequantizing inside a Triton GEMM's operand loads measured
several times slower than cuBLAS (bench/notes/HISTORY.md, v1-v3).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cast_to, cdiv, on_device
from ._launch import launch

BLOCK_M, BLOCK_N = 16, 512  # 8K elements per program: enough bytes in flight for a memory-bound pass


@triton.jit
def _dequantize_int8_kernel(codes_ptr, scale_ptr, out_ptr, n_rows, n_cols, stride_c, stride_o,
                            PER_ROW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    q = tl.load(codes_ptr + rows[:, None] * stride_c + cols[None, :], mask=mask, other=0).to(tl.float32)
    if PER_ROW:
        s = tl.load(scale_ptr + rows, mask=rows < n_rows, other=0.0)[:, None]
    else:
        s = tl.load(scale_ptr)
    # fp32 product, one rounding to the output dtype: the reference's (codes.float() * scale).to(dtype)
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], cast_to(q * s, out_ptr.dtype.element_ty), mask=mask)


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 ``codes`` [M, K] * fp32 ``scale`` ([] or [M]) rounded once to ``dtype`` -> [M, K]."""
    if codes.dim() != 2 or codes.dtype != torch.int8:
        raise TypeError(f"codes must be a 2-D int8 tensor, got {codes.dtype} of shape {tuple(codes.shape)}")
    m, k = codes.shape
    per_row = scale.dim() == 1
    if per_row and scale.shape[0] != m:
        raise ValueError(f"scale has {scale.shape[0]} entries for {m} rows of codes")
    if codes.stride(-1) != 1:
        codes = codes.contiguous()
    scale = scale.float().contiguous()
    out = torch.empty((m, k), device=codes.device, dtype=dtype)
    if out.numel():
        with on_device(codes):
            launch(_dequantize_int8_kernel, (cdiv(m, BLOCK_M), cdiv(k, BLOCK_N)),
                   codes, scale, out, m, k, codes.stride(0), out.stride(0),
                   PER_ROW=per_row, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=4)
    return out

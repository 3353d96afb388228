"""Per-token absmax INT8 activation quantization (BitNet b1.58): each program quantizes whole rows."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.quantization import ACT_EPS
from ._common import as_rows, cast_to, cdiv, on_device, round_half_to_even, row_tiling
from ._launch import launch


@triton.jit
def int8_row_scales(absmax):
    """Per-row multiplier 127/absmax and dequantization scale absmax/127, as the reference computes them."""
    # div_rn: Triton's '/' is approximate on GPUs; the codes must match the reference's IEEE reciprocal exactly.
    return tl.math.div_rn(1.0, absmax) * 127.0, absmax * (1.0 / 127.0)


@triton.jit
def load_row_tile(x_ptr, rows, row_mask, stride_x, n_cols, start, BLOCK: tl.constexpr):
    """Columns [start, start + BLOCK) of ``rows`` as fp32 (0 past the row's end) -> (cols, mask, tile)."""
    cols = start + tl.arange(0, BLOCK)
    mask = row_mask[:, None] & (cols[None, :] < n_cols)
    return cols, mask, tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_int8(out_ptrs, y, inv, scale, mask, DEQUANTIZE: tl.constexpr):
    """Quantize fp32 rows ``y`` [ROWS, BLOCK_N]; store the codes (or codes * scale in the output's dtype)."""
    q = round_half_to_even(y * inv[:, None])
    q = tl.minimum(tl.maximum(q, -128.0), 127.0)
    if DEQUANTIZE:
        q = q * scale[:, None]
    tl.store(out_ptrs, cast_to(q, out_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def store_int8_rows(out_ptr, y, absmax, rows, cols, row_mask, mask, stride_out, scale_ptr,
                    DEQUANTIZE: tl.constexpr):
    """Quantize whole rows held in registers by their absmax; store codes (or codes * scale) and the scales.
    Returns the rows' (multiplier, scale) for a second tile of the same rows."""
    inv, scale = int8_row_scales(absmax)
    store_int8(out_ptr + rows[:, None] * stride_out + cols[None, :], y, inv, scale, mask, DEQUANTIZE)
    tl.store(scale_ptr + rows, scale, mask=row_mask)
    return inv, scale


@triton.jit
def _quantize_activations_kernel(x_ptr, out_ptr, scale_ptr, n_rows, n_cols, stride_x, stride_out, eps,
                                 BLOCK_N: tl.constexpr, ROWS: tl.constexpr, CHUNKED: tl.constexpr,
                                 TAIL: tl.constexpr, DEQUANTIZE: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n_rows
    if not CHUNKED:  # the whole row in registers (BLOCK_N columns, plus TAIL more): one read of x
        cols, mask, x = load_row_tile(x_ptr, rows, row_mask, stride_x, n_cols, 0, BLOCK_N)
        if TAIL > 0:  # both loads before any reduction: a load issued after one waits out its barrier
            tail_cols, tail_mask, x_tail = load_row_tile(x_ptr, rows, row_mask, stride_x, n_cols, BLOCK_N, TAIL)
        absmax = tl.max(tl.abs(x), axis=1)
        if TAIL > 0:
            absmax = tl.maximum(absmax, tl.max(tl.abs(x_tail), axis=1))
        absmax = tl.maximum(absmax, eps)
        inv, scale = store_int8_rows(out_ptr, x, absmax, rows, cols, row_mask, mask, stride_out, scale_ptr, DEQUANTIZE)
        if TAIL > 0:
            store_int8(out_ptr + rows[:, None] * stride_out + tail_cols[None, :], x_tail, inv, scale, tail_mask,
                       DEQUANTIZE)
    else:  # long rows: absmax pass, then a quantizing pass whose re-read of the row is served by L2
        absmax = tl.zeros([ROWS], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            cols, mask, x = load_row_tile(x_ptr, rows, row_mask, stride_x, n_cols, start, BLOCK_N)
            absmax = tl.maximum(absmax, tl.max(tl.abs(x), axis=1))
        inv, scale = int8_row_scales(tl.maximum(absmax, eps))
        tl.store(scale_ptr + rows, scale, mask=row_mask)
        for start in range(0, n_cols, BLOCK_N):
            cols, mask, x = load_row_tile(x_ptr, rows, row_mask, stride_x, n_cols, start, BLOCK_N)
            store_int8(out_ptr + rows[:, None] * stride_out + cols[None, :], x, inv, scale, mask, DEQUANTIZE)


def _quantize_rows(x: torch.Tensor, eps: float, dequantize: bool):
    x2 = as_rows(x)
    m, n = x2.shape
    out = torch.empty(x2.shape, device=x.device, dtype=x.dtype if dequantize else torch.int8)
    scale = torch.empty(m, device=x.device, dtype=torch.float32)
    if m > 0:
        tiling = row_tiling(n)
        with on_device(x):
            launch(_quantize_activations_kernel, (cdiv(m, tiling.rows),),
                   x2, out, scale, m, n, x2.stride(0), out.stride(0), eps,
                   BLOCK_N=tiling.block_n, ROWS=tiling.rows, CHUNKED=tiling.chunked, TAIL=tiling.tail,
                   DEQUANTIZE=dequantize, num_warps=tiling.num_warps, enable_fp_fusion=False)
    return out.reshape(x.shape), scale.reshape(x.shape[:-1])


def quantize_activations_int8(x: torch.Tensor, eps: float = ACT_EPS):
    """``x`` [..., K] -> (int8 codes [..., K], float32 scale [...] = max(absmax, eps) / 127)."""
    return _quantize_rows(x.detach(), eps, dequantize=False)


class FakeQuantizeActivations(torch.autograd.Function):
    """Forward: per-token int8 codes * scale in x's dtype. Backward: identity (straight-through estimator)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float):
        return _quantize_rows(x, eps, dequantize=True)[0]

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return grad_out, None


def fake_quantize_activations(x: torch.Tensor, eps: float = ACT_EPS) -> torch.Tensor:
    return FakeQuantizeActivations.apply(x, eps)

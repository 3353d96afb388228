"""Per-token absmax INT8 activation quantization (BitNet b1.58): each program quantizes whole rows."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._base import ACT_EPS, as_rows
from ._common import cast_to, cdiv, on_device, round_half_to_even, row_tiling
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
def int8_code_values(y, inv, scale, DEQUANTIZE: tl.constexpr):
    """The int8 codes of fp32 ``y`` as floats (or codes * scale); ``inv`` and ``scale`` broadcast against ``y``."""
    q = round_half_to_even(y * inv)
    q = tl.minimum(tl.maximum(q, -128.0), 127.0)
    if DEQUANTIZE:
        q = q * scale
    return q


@triton.jit
def store_int8(out_ptrs, y, inv, scale, mask, DEQUANTIZE: tl.constexpr):
    """Quantize fp32 rows ``y`` [ROWS, BLOCK_N]; store the codes (or codes * scale in the output's dtype)."""
    q = int8_code_values(y, inv[:, None], scale[:, None], DEQUANTIZE)
    tl.store(out_ptrs, cast_to(q, out_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def store_int8_rows(out_ptr, y, absmax, rows, cols, row_mask, mask, stride_out, scale_ptr,
                    DEQUANTIZE: tl.constexpr):
    """Quantize whole rows held in registers by their absmax; store codes (or codes * scale) and the scales."""
    inv, scale = int8_row_scales(absmax)
    store_int8(out_ptr + rows[:, None] * stride_out + cols[None, :], y, inv, scale, mask, DEQUANTIZE)
    tl.store(scale_ptr + rows, scale, mask=row_mask)


# Rows of HEAD < n_cols <= HEAD + TAIL columns (row_tiling's tail), one per program, as two 1-D register tiles: 9728
# columns pad to 10240, not 16384. 1-D because [1, N] tiles compiled to a slower layout (bench/notes/bitlinear.md,
# "Tuning record").
@triton.jit
def load_head_tail(x_ptr, row, stride_x, n_cols, HEAD: tl.constexpr, TAIL: tl.constexpr):
    """-> (head columns, tail columns, the tail's mask, head tile, tail tile) of one row, fp32; both loads issued
    before any reduction (a load issued after one waits out its barrier)."""
    cols = tl.arange(0, HEAD)  # all inside the row
    tail_cols = HEAD + tl.arange(0, TAIL)
    tail_mask = tail_cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols).to(tl.float32)
    x_tail = tl.load(x_ptr + row * stride_x + tail_cols, mask=tail_mask, other=0.0).to(tl.float32)
    return cols, tail_cols, tail_mask, x, x_tail


@triton.jit
def store_int8_head_tail(out_ptr, scale_ptr, row, stride_out, y, y_tail, cols, tail_cols, tail_mask, eps,
                         DEQUANTIZE: tl.constexpr):
    """Quantize one row held as a head and a tail tile by its absmax (at least ``eps``); store codes and scale."""
    absmax = tl.maximum(tl.maximum(tl.max(tl.abs(y), axis=0), tl.max(tl.abs(y_tail), axis=0)), eps)
    inv, scale = int8_row_scales(absmax)
    tl.store(scale_ptr + row, scale)
    dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + row * stride_out + cols, cast_to(int8_code_values(y, inv, scale, DEQUANTIZE), dtype))
    tl.store(out_ptr + row * stride_out + tail_cols, cast_to(int8_code_values(y_tail, inv, scale, DEQUANTIZE), dtype),
             mask=tail_mask)


@triton.jit
def quantize_activation_rows(program, x_ptr, out_ptr, scale_ptr, n_rows, n_cols, stride_x, stride_out, eps,
                             BLOCK_N: tl.constexpr, ROWS: tl.constexpr, CHUNKED: tl.constexpr,
                             DEQUANTIZE: tl.constexpr):
    """The ROWS rows of ``program``: the kernel's body as a helper, so that ``ternarize_and_quantize`` runs it in the
    launch that codes the weight."""
    rows = program.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n_rows
    if not CHUNKED:  # the whole row in registers: one read of x
        cols, mask, x = load_row_tile(x_ptr, rows, row_mask, stride_x, n_cols, 0, BLOCK_N)
        absmax = tl.maximum(tl.max(tl.abs(x), axis=1), eps)
        store_int8_rows(out_ptr, x, absmax, rows, cols, row_mask, mask, stride_out, scale_ptr, DEQUANTIZE)
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


@triton.jit
def _quantize_activations_kernel(x_ptr, out_ptr, scale_ptr, n_rows, n_cols, stride_x, stride_out, eps,
                                 BLOCK_N: tl.constexpr, ROWS: tl.constexpr, CHUNKED: tl.constexpr,
                                 DEQUANTIZE: tl.constexpr):
    quantize_activation_rows(tl.program_id(0), x_ptr, out_ptr, scale_ptr, n_rows, n_cols, stride_x, stride_out, eps,
                             BLOCK_N, ROWS, CHUNKED, DEQUANTIZE)


@triton.jit
def _quantize_activations_head_tail_kernel(x_ptr, out_ptr, scale_ptr, n_cols, stride_x, stride_out, eps,
                                           HEAD: tl.constexpr, TAIL: tl.constexpr, DEQUANTIZE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols, tail_cols, tail_mask, x, x_tail = load_head_tail(x_ptr, row, stride_x, n_cols, HEAD, TAIL)
    store_int8_head_tail(out_ptr, scale_ptr, row, stride_out, x, x_tail, cols, tail_cols, tail_mask, eps, DEQUANTIZE)


def _quantize_rows(x: torch.Tensor, eps: float, dequantize: bool):
    x2 = as_rows(x)
    m, n = x2.shape
    out = torch.empty(x2.shape, device=x.device, dtype=x.dtype if dequantize else torch.int8)
    scale = torch.empty(m, device=x.device, dtype=torch.float32)
    if m > 0:
        tiling = row_tiling(n)
        with on_device(x):
            if tiling.tail:  # one row a program (row_tiling gives tails to single rows only)
                launch(_quantize_activations_head_tail_kernel, (m,), x2, out, scale, n, x2.stride(0), out.stride(0),
                       eps, HEAD=tiling.block_n, TAIL=tiling.tail, DEQUANTIZE=dequantize, num_warps=tiling.num_warps,
                       enable_fp_fusion=False)
            else:
                launch(_quantize_activations_kernel, (cdiv(m, tiling.rows),),
                       x2, out, scale, m, n, x2.stride(0), out.stride(0), eps,
                       BLOCK_N=tiling.block_n, ROWS=tiling.rows, CHUNKED=tiling.chunked, DEQUANTIZE=dequantize,
                       num_warps=tiling.num_warps, enable_fp_fusion=False)
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

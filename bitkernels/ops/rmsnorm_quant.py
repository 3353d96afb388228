"""SubLN RMSNorm fused with per-token INT8 quantization: x is read once, the normalized row never leaves registers.

Backward (straight-through through the quantizer) is the plain RMSNorm backward, from x and the saved 1/rms, with
dx optionally written over dy. For BitLinear it also writes the dequantized codes the weight-gradient GEMM needs,
from the same read of x: all of them (``rmsnorm_backward_and_dequantize``), or only each row's absmax
(``rmsnorm_backward_and_absmax``), from which ``rmsnorm_dequantize_columns`` makes them a column block at a time.
``quantize_input`` is BitLinear's input quantization, with or without the SubLN.

The backward's tiling constants are its tuning table; the measurements behind them are in bench/notes/bitlinear.md,
"Tuning record".
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._base import ACT_EPS, as_rows
from ._common import cast_to, cdiv, check_row_length, device_info, next_power_of_2, on_device, row_block, row_tiling
from ._launch import launch
from .act_quant import (int8_row_scales, load_head_tail, load_row_tile, quantize_activations_int8, store_int8,
                        store_int8_head_tail, store_int8_rows)

# Backward tiling. Rows padded past WHOLE_ROW_MAX columns take the two-kernel path (row dot, then column tiles): the
# whole-row kernel spills registers on longer rows, the pair runs at its own floor (5 passes over the data, not 3).
WHOLE_ROW_MAX = 4096
DOT_BLOCK, DOT_WARPS = 2048, 8  # long rows, step 1: the per-row dot in 2048-wide chunks
TILE_M, TILE_N, TILE_WARPS = 32, 128, 8  # long rows, step 2: column tiles over runs of rows
# The dw sum over per-program partial rows: 16 columns a program (128 programs over 2048 columns), 128 partial rows a
# step; about twice as fast as 32 columns, 64 rows and 4 warps.
SUM_BLOCK_P, SUM_BLOCK_N, SUM_WARPS = 128, 16, 8
DEQ_BLOCK_M, DEQ_BLOCK_N = 16, 512  # rmsnorm_dequantize_columns: dequantize_int8's tile, a memory-bound pass


@triton.jit
def rmsnorm_quantize_rows(program, x_ptr, w_ptr, out_ptr, scale_ptr, rstd_ptr, n_rows, n_cols, stride_x, stride_out,
                          eps, act_eps, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, CHUNKED: tl.constexpr,
                          DEQUANTIZE: tl.constexpr):
    """The ROWS rows of ``program`` (the kernel's body as a helper, as in ``act_quant``)."""
    rows = program.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n_rows
    if not CHUNKED:  # the whole row in registers: one read of x
        cols, mask, x = load_row_tile(x_ptr, rows, row_mask, stride_x, n_cols, 0, BLOCK_N)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)
        tl.store(rstd_ptr + rows, rstd, mask=row_mask)
        # The norm weight is loaded once 1/rms is known: live beside x through the reduction it costs registers,
        # so resident rows (faster in an ablation: bench/notes/bitlinear.md, "Tuning record").
        y = x * rstd[:, None] * tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]
        absmax = tl.maximum(tl.max(tl.abs(y), axis=1), act_eps)
        store_int8_rows(out_ptr, y, absmax, rows, cols, row_mask, mask, stride_out, scale_ptr, DEQUANTIZE)
    else:  # long rows: sum-of-squares, absmax and quantizing passes; the re-reads of the row are served by L2
        sum_sq = tl.zeros([ROWS], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            cols, mask, x = load_row_tile(x_ptr, rows, row_mask, stride_x, n_cols, start, BLOCK_N)
            sum_sq += tl.sum(x * x, axis=1)
        rstd = 1.0 / tl.sqrt(sum_sq / n_cols + eps)
        tl.store(rstd_ptr + rows, rstd, mask=row_mask)
        absmax = tl.zeros([ROWS], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            cols, mask, x = load_row_tile(x_ptr, rows, row_mask, stride_x, n_cols, start, BLOCK_N)
            w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            absmax = tl.maximum(absmax, tl.max(tl.abs(x * rstd[:, None] * w[None, :]), axis=1))
        inv, scale = int8_row_scales(tl.maximum(absmax, act_eps))
        tl.store(scale_ptr + rows, scale, mask=row_mask)
        for start in range(0, n_cols, BLOCK_N):
            cols, mask, x = load_row_tile(x_ptr, rows, row_mask, stride_x, n_cols, start, BLOCK_N)
            w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            y = x * rstd[:, None] * w[None, :]
            store_int8(out_ptr + rows[:, None] * stride_out + cols[None, :], y, inv, scale, mask, DEQUANTIZE)


@triton.jit
def _rmsnorm_quantize_fwd_kernel(x_ptr, w_ptr, out_ptr, scale_ptr, rstd_ptr, n_rows, n_cols, stride_x, stride_out,
                                 eps, act_eps, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, CHUNKED: tl.constexpr,
                                 DEQUANTIZE: tl.constexpr):
    rmsnorm_quantize_rows(tl.program_id(0), x_ptr, w_ptr, out_ptr, scale_ptr, rstd_ptr, n_rows, n_cols, stride_x,
                          stride_out, eps, act_eps, BLOCK_N, ROWS, CHUNKED, DEQUANTIZE)


@triton.jit
def _rmsnorm_quantize_fwd_head_tail_kernel(x_ptr, w_ptr, out_ptr, scale_ptr, rstd_ptr, n_cols, stride_x, stride_out,
                                           eps, act_eps, HEAD: tl.constexpr, TAIL: tl.constexpr,
                                           DEQUANTIZE: tl.constexpr):
    # Rows just past SINGLE_PASS_MAX columns (act_quant.load_head_tail): 1-D tiles, faster than the [1, N] tiles of
    # the kernel above.
    row = tl.program_id(0).to(tl.int64)
    cols, tail_cols, tail_mask, x, x_tail = load_head_tail(x_ptr, row, stride_x, n_cols, HEAD, TAIL)
    rstd = 1.0 / tl.sqrt((tl.sum(x * x, axis=0) + tl.sum(x_tail * x_tail, axis=0)) / n_cols + eps)
    tl.store(rstd_ptr + row, rstd)
    y = x * rstd * tl.load(w_ptr + cols).to(tl.float32)  # the norm weight loaded late, as above
    y_tail = x_tail * rstd * tl.load(w_ptr + tail_cols, mask=tail_mask, other=0.0).to(tl.float32)
    store_int8_head_tail(out_ptr, scale_ptr, row, stride_out, y, y_tail, cols, tail_cols, tail_mask, act_eps,
                         DEQUANTIZE)


@triton.jit
def _normalized_input(x, rstd, code_scale, inv_w, FROM_CODES: tl.constexpr):
    # x_hat = x * rstd; FROM_CODES: x holds the forward's int8 codes of x_hat * w, so x_hat = codes * scale / w
    if FROM_CODES:
        return x * code_scale[:, None] * inv_w[None, :]
    return x * rstd[:, None]


@triton.jit
def _load_bwd_rows(dy_ptr, x_ptr, rstd_ptr, code_scale_ptr, rows, cols, row_mask, mask, stride_dy, stride_x, inv_w,
                   FROM_CODES: tl.constexpr):
    # One tile of rows x columns of dy and x (or codes) in float32, the rows' 1/rms and code scale, and x_hat
    dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
    code_scale = tl.load(code_scale_ptr + rows, mask=row_mask, other=0.0)
    return dy, x, rstd, code_scale, _normalized_input(x, rstd, code_scale, inv_w, FROM_CODES)


@triton.jit
def _store_dequantized(xq_ptrs, x, x_hat, w, code_scale, absmax, mask, FROM_CODES: tl.constexpr):
    # The forward's quantized SubLN output, codes * scale, for the weight-gradient GEMM. From x it is rebuilt with
    # the forward's own rstd and the same elementwise products, so the codes are the forward's bit for bit.
    if FROM_CODES:
        tl.store(xq_ptrs, cast_to(x * code_scale[:, None], xq_ptrs.dtype.element_ty), mask=mask)
    else:
        inv, scale = int8_row_scales(absmax)
        store_int8(xq_ptrs, x_hat * w[None, :], inv, scale, mask, True)


@triton.jit
def _norm_weight_and_inverse(w_ptr, cols, col_mask):
    # 1/w rebuilds x_hat from the codes (codes * scale / w); 0 where w is 0, whose elements get no gradient.
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    return w, tl.where(w != 0.0, 1.0 / tl.where(w != 0.0, w, 1.0), 0.0)


@triton.jit
def _rmsnorm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, code_scale_ptr, dx_ptr, dw_partial_ptr, xq_ptr, absmax_ptr,
                        n_rows, n_cols, rows_per_program, stride_dy, stride_x, stride_dx, stride_xq, act_eps,
                        BLOCK_N: tl.constexpr, ROWS: tl.constexpr, FROM_CODES: tl.constexpr,
                        WRITE_XQ: tl.constexpr, WRITE_ABSMAX: tl.constexpr):
    # Whole rows in registers. Each program walks a contiguous run of rows, ROWS at a time, and keeps its share of
    # dw in registers: no atomics, deterministic. dx may overwrite dy: a row is read whole before it is written.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    w, inv_w = _norm_weight_and_inverse(w_ptr, cols, col_mask)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for first in range(row_start, row_end, ROWS):
        rows = first + tl.arange(0, ROWS)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        dy, x, rstd, code_scale, x_hat = _load_bwd_rows(dy_ptr, x_ptr, rstd_ptr, code_scale_ptr, rows, cols, row_mask,
                                                        mask, stride_dy, stride_x, inv_w, FROM_CODES)
        g = dy * w[None, :]
        c = tl.sum(g * x_hat, axis=1) / n_cols
        dx = rstd[:, None] * (g - x_hat * c[:, None])
        tl.store(dx_ptr + rows[:, None] * stride_dx + cols[None, :], cast_to(dx, dx_ptr.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * x_hat, axis=0)
        if WRITE_XQ or WRITE_ABSMAX:
            absmax = tl.maximum(tl.max(tl.abs(x_hat * w[None, :]), axis=1), act_eps)
            if WRITE_ABSMAX:
                tl.store(absmax_ptr + rows, absmax, mask=row_mask)
            if WRITE_XQ:
                _store_dequantized(xq_ptr + rows[:, None] * stride_xq + cols[None, :], x, x_hat, w, code_scale,
                                   absmax, mask, FROM_CODES)
    tl.store(dw_partial_ptr + pid * n_cols + cols, dw, mask=col_mask)


@triton.jit
def _rmsnorm_bwd_row_dot_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, code_scale_ptr, dot_ptr, absmax_ptr, n_rows,
                                n_cols, stride_dy, stride_x, act_eps, BLOCK_N: tl.constexpr,
                                FROM_CODES: tl.constexpr, WRITE_ABSMAX: tl.constexpr):
    # Long rows, step 1 of 2: per row, dot = sum(dy * w * x_hat) / n (and the absmax of x_hat * w), in chunks.
    row = tl.program_id(0).to(tl.int64)
    rstd = tl.load(rstd_ptr + row)
    code_scale = tl.load(code_scale_ptr + row)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    amax = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < n_cols
        dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if FROM_CODES:  # dy * w * (codes * scale / w) = dy * codes * scale where w != 0
            acc += dy * tl.where(w != 0.0, x, 0.0)
        else:
            acc += dy * w * x
            if WRITE_ABSMAX:
                amax = tl.maximum(amax, tl.abs(x * rstd * w))
    tl.store(dot_ptr + row, tl.sum(acc, axis=0) * (code_scale if FROM_CODES else rstd) / n_cols)
    if WRITE_ABSMAX and not FROM_CODES:
        tl.store(absmax_ptr + row, tl.maximum(tl.max(amax, axis=0), act_eps))


@triton.jit
def _rmsnorm_bwd_tile_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, code_scale_ptr, dot_ptr, absmax_ptr, dx_ptr,
                             dw_partial_ptr, xq_ptr, n_rows, n_cols, rows_per_program, stride_dy, stride_x,
                             stride_dx, stride_xq, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             FROM_CODES: tl.constexpr, WRITE_XQ: tl.constexpr):
    # Long rows, step 2 of 2: one column block over a run of rows; dx is elementwise given the row's dot, and dw
    # is summed in registers over the run (no atomics, deterministic). dx may overwrite dy: disjoint tiles.
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    w, inv_w = _norm_weight_and_inverse(w_ptr, cols, col_mask)
    dw = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    row_start = tl.program_id(1).to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for first in range(row_start, row_end, BLOCK_M):
        rows = first + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        dy, x, rstd, code_scale, x_hat = _load_bwd_rows(dy_ptr, x_ptr, rstd_ptr, code_scale_ptr, rows, cols, row_mask,
                                                        mask, stride_dy, stride_x, inv_w, FROM_CODES)
        dot = tl.load(dot_ptr + rows, mask=row_mask, other=0.0)
        dx = rstd[:, None] * (dy * w[None, :] - x_hat * dot[:, None])
        tl.store(dx_ptr + rows[:, None] * stride_dx + cols[None, :], cast_to(dx, dx_ptr.dtype.element_ty), mask=mask)
        dw += dy * x_hat
        if WRITE_XQ:
            absmax = tl.load(absmax_ptr + rows, mask=row_mask, other=1.0)
            _store_dequantized(xq_ptr + rows[:, None] * stride_xq + cols[None, :], x, x_hat, w, code_scale, absmax,
                               mask, FROM_CODES)
    tl.store(dw_partial_ptr + tl.program_id(1) * n_cols + cols, tl.sum(dw, axis=0), mask=col_mask)


@triton.jit
def _sum_dw_partials_kernel(partial_ptr, dw_ptr, n_partials, n_cols, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    # Column sums of the backward's per-program dw rows, in a fixed order (deterministic), rounded once to the norm
    # weight's dtype: faster than torch's dim-0 sum and cast (bench/notes/bitlinear.md, "Tuning record").
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for start in range(0, n_partials, BLOCK_P):
        p = start + tl.arange(0, BLOCK_P)
        acc += tl.load(partial_ptr + p[:, None] * n_cols + cols[None, :],
                       mask=(p[:, None] < n_partials) & col_mask[None, :], other=0.0)
    tl.store(dw_ptr + cols, cast_to(tl.sum(acc, axis=0), dw_ptr.dtype.element_ty), mask=col_mask)


def _sum_dw_partials(dw_partial: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n_partials, n = dw_partial.shape
    dw = torch.empty(n, device=dw_partial.device, dtype=dtype)
    if n:
        launch(_sum_dw_partials_kernel, (cdiv(n, SUM_BLOCK_N),), dw_partial, dw, n_partials, n,
               BLOCK_P=SUM_BLOCK_P, BLOCK_N=SUM_BLOCK_N, num_warps=SUM_WARPS)
    return dw


def rmsnorm_quantize_int8_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, act_eps: float,
                                  dequantize: bool = False, out_dtype: torch.dtype | None = None):
    """Rows of ``x`` [M, N] -> (int8 codes, or codes*scale in ``out_dtype`` (default x's dtype); float32 scale [M];
    float32 1/rms [M])."""
    x2 = as_rows(x)
    m, n = x2.shape
    w, device = weight.contiguous(), x.device
    out = torch.empty(x2.shape, device=device, dtype=(out_dtype or x.dtype) if dequantize else torch.int8)
    scale = torch.empty(m, device=device, dtype=torch.float32)
    rstd = torch.empty(m, device=device, dtype=torch.float32)
    if m > 0:
        tiling = row_tiling(n)
        with on_device(x):
            if tiling.tail:  # one row a program (row_tiling gives tails to single rows only)
                launch(_rmsnorm_quantize_fwd_head_tail_kernel, (m,),
                       x2, w, out, scale, rstd, n, x2.stride(0), out.stride(0), eps, act_eps,
                       HEAD=tiling.block_n, TAIL=tiling.tail, DEQUANTIZE=dequantize, num_warps=tiling.num_warps,
                       enable_fp_fusion=False)
            else:
                launch(_rmsnorm_quantize_fwd_kernel, (cdiv(m, tiling.rows),),
                       x2, w, out, scale, rstd, m, n, x2.stride(0), out.stride(0), eps, act_eps,
                       BLOCK_N=tiling.block_n, ROWS=tiling.rows, CHUNKED=tiling.chunked, DEQUANTIZE=dequantize,
                       num_warps=tiling.num_warps, enable_fp_fusion=False)
    return out, scale, rstd


def quantize_input(x2: torch.Tensor, norm_weight: torch.Tensor | None, norm_eps: float, act_eps: float):
    """BitLinear's input quantization of rows [M, K] -> (int8 codes, fp32 per-token scale, fp32 1/rms or None): SubLN
    fused with the quantization. The x half alone, in its own launch: for cached weight codes, and for rows that
    ``ternarize_and_quantize`` leaves to the separate ops."""
    if norm_weight is None:
        codes, scale = quantize_activations_int8(x2, act_eps)
        return codes, scale, None
    return rmsnorm_quantize_int8_forward(x2, norm_weight, norm_eps, act_eps)


def whole_row_bwd_block(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_N, ROWS a step, num_warps) of the whole-row backward: ``row_block``'s, but one row a step at 2048
    padded columns and two at 4096 when a quarter or more of the tile is padding: the fastest in a sweep of rows a
    step per row length (bench/notes/bitlinear.md, "Tuning record")."""
    block_n, rows, num_warps = row_block(n_cols)
    if block_n == 2048:
        rows = 1
    elif block_n == 4096 and 4 * n_cols <= 3 * block_n:
        rows = 2
    return block_n, rows, num_warps


def _rmsnorm_backward(dy, x, weight, rstd, code_scale, out_dtype, dequantized_dtype, act_eps, write_absmax=False,
                      overwrite_dy=False):
    dy2 = as_rows(dy)
    m, n = x.shape
    device = x.device
    dx_dtype = out_dtype or x.dtype
    if overwrite_dy and (dy2.dtype != dx_dtype or dy2.stride(-1) != 1 or dy2.shape != x.shape):
        raise ValueError(f"overwrite_dy needs dy of dx's dtype {dx_dtype} and shape {tuple(x.shape)} with unit "
                         f"column stride, got {dy2.dtype} {tuple(dy2.shape)} strides {dy2.stride()}")
    dx = dy2 if overwrite_dy else torch.empty((m, n), device=device, dtype=dx_dtype)
    write_xq = dequantized_dtype is not None
    xq = torch.empty((m, n), device=device, dtype=dequantized_dtype) if write_xq else dx
    from_codes = code_scale is not None
    write_absmax = write_absmax and not from_codes  # from codes, the forward's code scale is the row's absmax / 127
    long_rows = next_power_of_2(n) > WHOLE_ROW_MAX
    # The long-row pair passes the absmax from its first kernel to its second; the whole-row kernel keeps it.
    absmax_buffer = write_absmax or (long_rows and write_xq and not from_codes)
    absmax = torch.empty(m, device=device, dtype=torch.float32) if absmax_buffer else rstd
    extra = (xq if write_xq else None, absmax if write_absmax else None)
    if m == 0:
        return (dx, torch.zeros_like(weight)) + extra
    code_scale = code_scale if from_codes else rstd  # an unused pointer when not from codes
    if not long_rows:
        block_n, rows, num_warps = whole_row_bwd_block(n)
        rows_per_program = cdiv(cdiv(m, 4 * device_info(device).sm_count), rows) * rows
        n_programs = cdiv(m, rows_per_program)
        dw_partial = torch.empty((n_programs, n), device=device, dtype=torch.float32)
        with on_device(x):
            launch(_rmsnorm_bwd_kernel, (n_programs,),
                   dy2, x, weight, rstd, code_scale, dx, dw_partial, xq, absmax, m, n, rows_per_program,
                   dy2.stride(0), x.stride(0), dx.stride(0), xq.stride(0), act_eps, BLOCK_N=block_n, ROWS=rows,
                   FROM_CODES=from_codes, WRITE_XQ=write_xq, WRITE_ABSMAX=write_absmax, num_warps=num_warps,
                   enable_fp_fusion=False)
    else:
        dot = torch.empty(m, device=device, dtype=torch.float32)
        col_blocks = cdiv(n, TILE_N)
        splits = max(1, cdiv(16 * device_info(device).sm_count, col_blocks))
        rows_per_program = cdiv(cdiv(m, splits), TILE_M) * TILE_M
        splits = cdiv(m, rows_per_program)
        dw_partial = torch.empty((splits, n), device=device, dtype=torch.float32)
        with on_device(x):
            launch(_rmsnorm_bwd_row_dot_kernel, (m,),
                   dy2, x, weight, rstd, code_scale, dot, absmax, m, n, dy2.stride(0), x.stride(0), act_eps,
                   BLOCK_N=DOT_BLOCK, FROM_CODES=from_codes, WRITE_ABSMAX=write_absmax or write_xq,
                   num_warps=DOT_WARPS)
            launch(_rmsnorm_bwd_tile_kernel, (col_blocks, splits),
                   dy2, x, weight, rstd, code_scale, dot, absmax, dx, dw_partial, xq, m, n, rows_per_program,
                   dy2.stride(0), x.stride(0), dx.stride(0), xq.stride(0), BLOCK_M=TILE_M, BLOCK_N=TILE_N,
                   FROM_CODES=from_codes, WRITE_XQ=write_xq, num_warps=TILE_WARPS, enable_fp_fusion=False)
    with on_device(x):
        dw = _sum_dw_partials(dw_partial, weight.dtype)
    return (dx, dw) + extra


def rmsnorm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                     code_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                     overwrite_dy: bool = False):
    """RMSNorm gradients from rows ``dy``, ``x`` [M, N] and the forward's 1/rms: -> (dx, dw). With ``code_scale``,
    ``x`` is instead the forward's int8 codes of RMSNorm(x)*weight and ``code_scale`` their per-row scale
    (the STE gradient then uses the quantized x_hat). dx is in ``out_dtype`` (default: x's dtype).
    ``overwrite_dy``: dx is written into dy's memory (dy must then be rows of dx's dtype), one [M, N] buffer less."""
    return _rmsnorm_backward(dy, x, weight, rstd, code_scale, out_dtype, None, ACT_EPS,
                             overwrite_dy=overwrite_dy)[:2]


def rmsnorm_backward_and_dequantize(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                                    act_eps: float, dequantized_dtype: torch.dtype,
                                    code_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                                    overwrite_dy: bool = False):
    """``rmsnorm_backward`` that also returns the forward's quantized SubLN output as codes * scale in
    ``dequantized_dtype`` (the BitLinear weight-gradient GEMM's operand), written while x is in registers: one pass
    over x in the backward instead of two. From x (not codes), ``rstd`` must be the forward's own 1/rms (the codes
    are rebuilt bit for bit from it). -> (dx, dw, dequantized [M, N])."""
    return _rmsnorm_backward(dy, x, weight, rstd, code_scale, out_dtype, dequantized_dtype, act_eps,
                             overwrite_dy=overwrite_dy)[:3]


def rmsnorm_backward_and_absmax(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                                act_eps: float, out_dtype: torch.dtype | None = None, overwrite_dy: bool = False):
    """``rmsnorm_backward`` from x that also returns each row's absmax of the SubLN output (fp32 [M], the forward's
    quantization scale * 127, bit for bit): with it, ``rmsnorm_dequantize_columns`` rebuilds the dequantized codes a
    column block at a time, where ``rmsnorm_backward_and_dequantize`` writes all [M, N] of them at once.
    -> (dx, dw, absmax)."""
    dx, dw, _, absmax = _rmsnorm_backward(dy, x, weight, rstd, None, out_dtype, None, act_eps, write_absmax=True,
                                          overwrite_dy=overwrite_dy)
    return dx, dw, absmax


@triton.jit
def _rmsnorm_dequantize_columns_kernel(x_ptr, w_ptr, rstd_ptr, absmax_ptr, out_ptr, n_rows, n_cols, col_start,
                                       stride_x, stride_out, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # The backward's own _normalized_input and _store_dequantized on a column block: the forward's codes.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols[None, :] < n_cols)
    x = tl.load(x_ptr + rows[:, None] * stride_x + (col_start + cols)[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + col_start + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
    absmax = tl.load(absmax_ptr + rows, mask=row_mask, other=1.0)
    x_hat = _normalized_input(x, rstd, rstd, w, False)
    _store_dequantized(out_ptr + rows[:, None] * stride_out + cols[None, :], x, x_hat, w, rstd, absmax, mask, False)


def rmsnorm_dequantize_columns(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, absmax: torch.Tensor,
                               start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Columns [start, stop) of the forward's quantized SubLN output, codes * scale in ``dtype`` [M, stop - start],
    from rows ``x`` [M, N], the forward's 1/rms and ``rmsnorm_backward_and_absmax``'s absmax: bit for bit the same
    columns of ``rmsnorm_backward_and_dequantize``'s output."""
    m, n = x.shape
    if not 0 <= start <= stop <= n:
        raise ValueError(f"columns [{start}, {stop}) are not within the {n} columns of x")
    out = torch.empty((m, stop - start), device=x.device, dtype=dtype)
    if out.numel():
        with on_device(x):
            launch(_rmsnorm_dequantize_columns_kernel, (cdiv(m, DEQ_BLOCK_M), cdiv(stop - start, DEQ_BLOCK_N)),
                   x, weight, rstd, absmax, out, m, stop - start, start, x.stride(0), out.stride(0),
                   BLOCK_M=DEQ_BLOCK_M, BLOCK_N=DEQ_BLOCK_N, num_warps=4, enable_fp_fusion=False)
    return out


def rmsnorm_quantize_int8(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, act_eps: float = ACT_EPS):
    """SubLN RMSNorm + per-token int8: ``x`` [..., N] -> (int8 codes [..., N], float32 scale [...])."""
    codes, scale, _ = rmsnorm_quantize_int8_forward(x.detach(), weight.detach(), eps, act_eps)
    return codes.reshape(x.shape), scale.reshape(x.shape[:-1])


class RMSNormFakeQuantize(torch.autograd.Function):
    """Forward: int8 fake quantization of RMSNorm(x) * weight, in x's dtype. Backward: the RMSNorm's gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, act_eps: float):
        check_row_length(x.shape[-1])  # the backward keeps rows in registers: refuse too-long rows before any work
        x2 = as_rows(x)
        out, _, rstd = rmsnorm_quantize_int8_forward(x2, weight, eps, act_eps, dequantize=True)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return out.reshape(x.shape)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = rmsnorm_backward(grad_out.reshape(x2.shape), x2, weight, rstd)
        return dx.reshape(ctx.x_shape), dw, None, None


def rmsnorm_fake_quantize(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                          act_eps: float = ACT_EPS) -> torch.Tensor:
    return RMSNormFakeQuantize.apply(x, weight, eps, act_eps)

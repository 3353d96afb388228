"""SubLN RMSNorm fused with per-token INT8 quantization: x is read once, the normalized row never leaves registers.

Backward (straight-through through the quantizer) is the plain RMSNorm backward, from x and the saved 1/rms.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.quantization import ACT_EPS
from ._common import as_rows, cast_to, check_row_length, on_device, row_block, row_tiling
from .act_quant import int8_row_scales, store_int8, store_int8_rows


@triton.jit
def _rmsnorm_quantize_fwd_kernel(x_ptr, w_ptr, out_ptr, scale_ptr, rstd_ptr, n_rows, n_cols, stride_x, stride_out,
                                 eps, act_eps, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, CHUNKED: tl.constexpr,
                                 DEQUANTIZE: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n_rows
    if not CHUNKED:  # the whole row in registers: one read of x
        cols = tl.arange(0, BLOCK_N)
        mask = row_mask[:, None] & (cols[None, :] < n_cols)
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)
        y = x * rstd[:, None] * w[None, :]
        tl.store(rstd_ptr + rows, rstd, mask=row_mask)
        absmax = tl.maximum(tl.max(tl.abs(y), axis=1), act_eps)
        store_int8_rows(out_ptr, y, absmax, rows, cols, row_mask, mask, stride_out, scale_ptr, DEQUANTIZE)
    else:  # long rows: sum-of-squares, absmax and quantizing passes; the re-reads of the row are served by L2
        sum_sq = tl.zeros([ROWS], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = row_mask[:, None] & (cols[None, :] < n_cols)
            x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            sum_sq += tl.sum(x * x, axis=1)
        rstd = 1.0 / tl.sqrt(sum_sq / n_cols + eps)
        tl.store(rstd_ptr + rows, rstd, mask=row_mask)
        absmax = tl.zeros([ROWS], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = row_mask[:, None] & (cols[None, :] < n_cols)
            x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            absmax = tl.maximum(absmax, tl.max(tl.abs(x * rstd[:, None] * w[None, :]), axis=1))
        inv, scale = int8_row_scales(tl.maximum(absmax, act_eps))
        tl.store(scale_ptr + rows, scale, mask=row_mask)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = row_mask[:, None] & (cols[None, :] < n_cols)
            x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            y = x * rstd[:, None] * w[None, :]
            store_int8(out_ptr + rows[:, None] * stride_out + cols[None, :], y, inv, scale, mask, DEQUANTIZE)


@triton.jit
def _rmsnorm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, code_scale_ptr, dx_ptr, dw_partial_ptr, n_rows, n_cols,
                        rows_per_program, stride_dy, stride_x, stride_dx,
                        BLOCK_N: tl.constexpr, ROWS: tl.constexpr, FROM_CODES: tl.constexpr):
    # Each program walks a contiguous run of rows, ROWS at a time, and keeps its share of dw in registers:
    # no atomics, deterministic. FROM_CODES: x_ptr holds the forward's int8 codes of y = x_hat * w, so x_hat is
    # rebuilt as codes * scale / w and the bf16 input need not be kept for backward.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    if FROM_CODES:
        inv_w = tl.where(w != 0.0, 1.0 / tl.where(w != 0.0, w, 1.0), 0.0)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for first in range(row_start, row_end, ROWS):
        rows = first + tl.arange(0, ROWS)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        if FROM_CODES:
            code_scale = tl.load(code_scale_ptr + rows, mask=row_mask, other=0.0)
            x_hat = x * code_scale[:, None] * inv_w[None, :]
        else:
            x_hat = x * rstd[:, None]
        g = dy * w[None, :]
        c = tl.sum(g * x_hat, axis=1) / n_cols
        dx = rstd[:, None] * (g - x_hat * c[:, None])
        tl.store(dx_ptr + rows[:, None] * stride_dx + cols[None, :], cast_to(dx, dx_ptr.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * x_hat, axis=0)
    tl.store(dw_partial_ptr + pid * n_cols + cols, dw, mask=col_mask)


def rmsnorm_quantize_int8_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, act_eps: float,
                                  dequantize: bool = False, out_dtype: torch.dtype | None = None):
    """Rows of ``x`` [M, N] -> (int8 codes, or codes*scale in ``out_dtype`` (default x's dtype); float32 scale [M];
    float32 1/rms [M])."""
    x2 = as_rows(x)
    m, n = x2.shape
    w = weight.contiguous()
    out = torch.empty(x2.shape, device=x.device, dtype=(out_dtype or x.dtype) if dequantize else torch.int8)
    scale = torch.empty(m, device=x.device, dtype=torch.float32)
    rstd = torch.empty(m, device=x.device, dtype=torch.float32)
    if m > 0:
        block_n, rows, num_warps, chunked = row_tiling(n)
        with on_device(x):
            _rmsnorm_quantize_fwd_kernel[(triton.cdiv(m, rows),)](
                x2, w, out, scale, rstd, m, n, x2.stride(0), out.stride(0), eps, act_eps,
                BLOCK_N=block_n, ROWS=rows, CHUNKED=chunked, DEQUANTIZE=dequantize, num_warps=num_warps,
                enable_fp_fusion=False)
    return out, scale, rstd


def rmsnorm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                     code_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None):
    """RMSNorm gradients from rows ``dy``, ``x`` [M, N] and the forward's 1/rms: -> (dx, dw). With ``code_scale``,
    ``x`` is instead the forward's int8 codes of RMSNorm(x)*weight and ``code_scale`` their per-row scale
    (the STE gradient then uses the quantized x_hat). dx is in ``out_dtype`` (default: x's dtype)."""
    dy2 = as_rows(dy)
    m, n = x.shape
    dx = torch.empty((m, n), device=x.device, dtype=out_dtype or x.dtype)
    if m == 0:
        return dx, torch.zeros_like(weight)
    block_n, rows, num_warps = row_block(n)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 2
    rows_per_program = triton.cdiv(triton.cdiv(m, 4 * sms), rows) * rows
    n_programs = triton.cdiv(m, rows_per_program)
    dw_partial = torch.empty((n_programs, n), device=x.device, dtype=torch.float32)
    from_codes = code_scale is not None
    with on_device(x):
        _rmsnorm_bwd_kernel[(n_programs,)](
            dy2, x, weight, rstd, code_scale if from_codes else rstd, dx, dw_partial, m, n, rows_per_program,
            dy2.stride(0), x.stride(0), dx.stride(0), BLOCK_N=block_n, ROWS=rows, FROM_CODES=from_codes,
            num_warps=num_warps)
    return dx, dw_partial.sum(0).to(weight.dtype)


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

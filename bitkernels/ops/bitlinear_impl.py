"""The BitLinear op on plain tensors (no autograd): forward, backward and the choices they share.

Both entry points run these same functions: the eager autograd Function of ``ops.bitlinear`` and the custom ops of
``ops.bitlinear_library`` (torch.compile, CUDA graphs). See ``ops.bitlinear``'s docstring for the design: what the
forward launches, what the backward computes and what is saved for it.
"""
from __future__ import annotations

import torch

from .._base import as_rows
from ..reference.bitlinear import bitlinear_grad_weight  # a plain cuBLAS GEMM: the reference is the op
from .dequantize import dequantize_int8
from .int8_matmul import int8_matmul
from .rmsnorm_quant import (quantize_input, rmsnorm_backward, rmsnorm_backward_and_absmax,
                            rmsnorm_backward_and_dequantize, rmsnorm_dequantize_columns)

# The weight gradient's operand, x's dequantized codes [M, K], is made this many bytes at a time (a block of K's
# columns, its slice of grad_W's GEMM right after) once the whole of it would be larger: that copy would otherwise
# be the backward's largest temporary beside grad_x, which plain nn.Linear never makes. At 8192 tokens in bf16 a
# block is 1024 columns, a GEMM of 16M x N multiply-adds: long enough on the GPU to hide the block's two launches.
GRAD_WEIGHT_BLOCK_BYTES = 16 << 20
# Split K into equal blocks (multiples of 128, none wider than the budget's) instead of full-width blocks and a
# narrow tail (9728 = 9 x 1024 + 512): a candidate for the tail GEMM's low occupancy, off until an A/B on a GPU
# (bench/tools/ab_grad_weight_block.py) shows it pays.
GRAD_WEIGHT_EQUAL_BLOCKS = False


def bitlinear_grad_input(grad_y: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """grad_x [M, K] = grad_y [M, N] @ (Wq * s), Wq int8 [N, K], s per tensor [] or per output channel [N]; the
    dequantized weight is rounded to grad_y's dtype, as the reference's fake-quantized weight is. ``torch.mm``, not
    ``@``: the operator goes through Tensor.__matmul__'s Python wrapper and matmul's shape logic first."""
    return torch.mm(grad_y, dequantize_int8(w_codes, w_scale, grad_y.dtype))


def grad_weight_block_columns(m: int, k: int, dtype: torch.dtype) -> int:
    """Columns of x's dequantized codes made at a time for grad_W: all ``k`` when they fit in
    ``GRAD_WEIGHT_BLOCK_BYTES``, else a multiple of 128 (at least 128) that does."""
    per_column = max(m, 1) * dtype.itemsize
    if k * per_column <= GRAD_WEIGHT_BLOCK_BYTES:
        return k
    return max(128, GRAD_WEIGHT_BLOCK_BYTES // per_column // 128 * 128)


def grad_weight_block_bounds(k: int, block: int, equal: bool = False) -> list[tuple[int, int]]:
    """(start, stop) of each block of K's columns: full ``block``-wide ones and a ragged tail, or with ``equal``
    as many blocks, their widths multiples of 128 that differ by at most 128 (the last one ragged at K's end);
    ``block`` is then a multiple of 128, as ``grad_weight_block_columns`` makes it where it is under K."""
    if block >= k or not equal or block % 128:
        return [(i, min(i + block, k)) for i in range(0, k, block)]
    count, units = -(-k // block), -(-k // 128)
    base, wider = divmod(units, count)  # 128-column units a block: the first ``wider`` blocks get one more
    bounds, start = [], 0
    for b in range(count):
        stop = min(start + 128 * (base + (b < wider)), k)
        bounds.append((start, stop))
        start = stop
    return bounds


def bitlinear_grad_weight_blocks(grad_y: torch.Tensor, dequantized_columns, k: int, block: int,
                                 out_dtype: torch.dtype) -> torch.Tensor:
    """grad_W [N, K] = grad_y^T @ x_deq, one block of ``block`` columns of x_deq at a time:
    ``dequantized_columns(start, stop)`` makes x_deq[:, start:stop] and it is freed after its GEMM. Each element is
    the same dot over M as in one GEMM; the GEMMs write straight into grad_W's columns when it is grad_y's dtype."""
    grad_w = torch.empty((grad_y.shape[1], k), device=grad_y.device, dtype=out_dtype)
    g_t = grad_y.t()
    for start, stop in grad_weight_block_bounds(k, block, GRAD_WEIGHT_EQUAL_BLOCKS):
        x_block = dequantized_columns(start, stop)
        if out_dtype == grad_y.dtype:
            torch.mm(g_t, x_block, out=grad_w[:, start:stop])
        else:
            grad_w[:, start:stop] = torch.mm(g_t, x_block)
        del x_block
    return grad_w


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Dtype of the GEMM outputs and of the backward GEMMs: autocast's where it is on (as for ``F.linear``, so a model
    with fp32 master weights under bf16 autocast runs its backward on bf16 tensor cores, not fp32 ones), else x's.
    Quantization reads x in its own dtype either way, as the reference's fake quantization does."""
    device_type = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def bitlinear_forward_impl(x, bias, norm_weight, w_codes, w_scale, norm_eps: float, act_eps: float,
                           out_dtype: torch.dtype, quantized: tuple | None = None):
    """The forward on tensors alone (no autograd): -> (y [..., N], x's int8 codes [M, K], their fp32 scale [M],
    fp32 1/rms [M] or None without SubLN). ``quantized``: those three, already made (``ternarize_and_quantize``).
    Shared by the eager autograd Function and the custom op."""
    if quantized is None:
        quantized = quantize_input(as_rows(x), norm_weight, norm_eps, act_eps)
    codes, a_scale, rstd = quantized
    y = int8_matmul(codes, w_codes, a_scale, w_scale, bias, out_dtype=out_dtype)
    if x.dim() != 2:  # a reshape, even a no-op one, costs host time: only where x is not rows already
        y = y.reshape(*x.shape[:-1], w_codes.shape[0])
    return y, codes, a_scale, rstd


def bitlinear_backward_impl(grad_y, x, codes, a_scale, rstd, w_codes, w_scale, norm_weight, norm_eps: float,
                            act_eps: float, x_dtype: torch.dtype, weight_dtype: torch.dtype,
                            bias_dtype: torch.dtype, grad_input: bool, grad_weight: bool, grad_bias: bool):
    """The backward on tensors alone: -> (grad_x [M, K], grad_W, grad_bias, grad_norm_weight), None where not asked
    for (``grad_input`` asks for x's and the norm weight's). Saved state: ``x`` and the forward's ``rstd`` (SubLN
    with save_input: the codes are rebuilt from them bit for bit) or else ``codes``, ``a_scale`` and (SubLN)
    ``rstd``. Shared as the forward is."""
    g2 = grad_y if grad_y.dim() == 2 else grad_y.reshape(-1, w_codes.shape[0])
    if g2.stride(-1) != 1:
        g2 = g2.contiguous()
    if x is not None:
        if rstd is None or rstd.numel() != x.numel() // max(x.shape[-1], 1):
            got = None if rstd is None else tuple(rstd.shape)
            raise ValueError(f"a backward from the saved input x needs the forward's 1/rms (rstd), one per row; "
                             f"got {got} for x {tuple(x.shape)}")
        x = as_rows(x)
    grad_x = grad_w = grad_b = grad_nw = x_deq = absmax = None
    k = w_codes.shape[1]
    block = grad_weight_block_columns(g2.shape[0], k, g2.dtype) if grad_weight else k
    if grad_input:
        grad_h = bitlinear_grad_input(g2, w_codes, w_scale)  # d loss / d (quantized) normalized input, STE
        if norm_weight is None:
            grad_x = grad_h.to(x_dtype)
        else:
            # dx over grad_h where the dtypes agree: grad_h is ours and dead after this pass, one [M, K] less
            source, code_scale = (x, None) if x is not None else (codes, a_scale)
            overwrite = grad_h.dtype == x_dtype
            if grad_weight and block == k:  # the same pass over x (or its codes) writes the GEMM's operand
                grad_x, grad_nw, x_deq = rmsnorm_backward_and_dequantize(grad_h, source, norm_weight, rstd, act_eps,
                                                                         g2.dtype, code_scale, x_dtype, overwrite)
            elif grad_weight and x is not None:  # in blocks after this pass, from x and each row's absmax
                grad_x, grad_nw, absmax = rmsnorm_backward_and_absmax(grad_h, x, norm_weight, rstd, act_eps, x_dtype,
                                                                      overwrite)
            else:
                grad_x, grad_nw = rmsnorm_backward(grad_h, source, norm_weight, rstd, code_scale, x_dtype, overwrite)
        del grad_h
    if grad_weight:
        if x_deq is None and absmax is None and x is not None:
            # Only W's gradient asked (x and the norm weight frozen: rare). The same pass with a zero upstream
            # gradient rebuilds the codes from the forward's own 1/rms: bit for bit, where re-running the forward's
            # pass would recompute 1/rms, on a GPU possibly an ulp apart.
            x_deq = rmsnorm_backward_and_dequantize(torch.zeros_like(x), x, norm_weight, rstd, act_eps, g2.dtype)[2]
        if x_deq is not None:
            grad_w = bitlinear_grad_weight(g2, x_deq, weight_dtype)
        elif absmax is not None:
            grad_w = bitlinear_grad_weight_blocks(
                g2, lambda i, j: rmsnorm_dequantize_columns(x, norm_weight, rstd, absmax, i, j, g2.dtype), k, block,
                weight_dtype)
        elif block == k:
            grad_w = bitlinear_grad_weight(g2, dequantize_int8(codes, a_scale, g2.dtype), weight_dtype)
        else:
            grad_w = bitlinear_grad_weight_blocks(
                g2, lambda i, j: dequantize_int8(codes[:, i:j], a_scale, g2.dtype), k, block, weight_dtype)
    if grad_bias:
        grad_b = g2.sum(0, dtype=torch.float32).to(bias_dtype)
    return grad_x, grad_w, grad_b, grad_nw


def keeps_input(norm_weight, save_input: bool) -> bool:
    """Whether the backward keeps x (SubLN with save_input: exact grads) rather than x's int8 codes."""
    return save_input and norm_weight is not None

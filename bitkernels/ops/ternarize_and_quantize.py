"""The forward's two quantizations in one launch: the weight's ternary codes (per-tensor scale) beside x's per-token
int8 codes (with or without the SubLN RMSNorm).

A training forward ternarizes the weight (it changed at the last optimizer step) and quantizes x: three launches as
separate ops (|w| partial sums, codes, x's rows). The codes pass and x's rows do not depend on each other, so after
the partial sums one launch runs both: programs [0, n_weight_programs) code the weight (first, while the partial
sums' pass has left it in L2), the rest quantize x's rows. One launch and one kernel boundary less per forward. Every
program runs the separate kernels' own code (``ternarize_tensor_block``, ``rmsnorm_quantize_rows`` /
``quantize_activation_rows``), and the weight scale does not depend on the launch (``absmean_from_partials``), so
codes and scales are the separate ops' bit for bit.

The one launch took less kernel time than the separate ops at every measured row length that fits one register
tile; rows longer than SINGLE_PASS_MAX (one a program, in head and tail tiles) ran slower in one launch, so those take
the separate ops (bench/notes/bitlinear.md, "Tuning record"). Per-channel weight scales keep their own single-launch
kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._base import ACT_EPS, WEIGHT_EPS, as_rows
from ._common import cdiv, next_power_of_2, on_device, row_tiling
from ._launch import launch
from .act_quant import quantize_activation_rows
from .rmsnorm_quant import quantize_input, rmsnorm_quantize_rows
from .ternarize import abs_sum_partials, codes_chunks, ternarize_absmean, ternarize_tensor_block


@triton.jit
def _ternarize_and_quantize_kernel(w_ptr, w_codes_ptr, partial_ptr, w_scale_ptr, w_numel, n_partials, w_eps,
                                   n_w_programs, x_ptr, norm_ptr, codes_ptr, scale_ptr, rstd_ptr, n_rows, n_cols,
                                   stride_x, stride_codes, norm_eps, act_eps, W_BLOCK: tl.constexpr,
                                   W_CHUNKS: tl.constexpr, PARTIALS: tl.constexpr, BLOCK_N: tl.constexpr,
                                   ROWS: tl.constexpr, NORM: tl.constexpr):
    pid = tl.program_id(0)
    if pid < n_w_programs:
        ternarize_tensor_block(pid, n_w_programs, w_ptr, w_codes_ptr, partial_ptr, w_scale_ptr, w_numel, n_partials,
                               w_eps, W_BLOCK, W_CHUNKS, PARTIALS, False)
    elif NORM:
        rmsnorm_quantize_rows(pid - n_w_programs, x_ptr, norm_ptr, codes_ptr, scale_ptr, rstd_ptr, n_rows, n_cols,
                              stride_x, stride_codes, norm_eps, act_eps, BLOCK_N, ROWS, False, False)
    else:
        quantize_activation_rows(pid - n_w_programs, x_ptr, codes_ptr, scale_ptr, n_rows, n_cols, stride_x,
                                 stride_codes, act_eps, BLOCK_N, ROWS, False, False)


def ternarize_and_quantize_forward(weight: torch.Tensor, x: torch.Tensor, norm_weight: torch.Tensor | None,
                                   norm_eps: float = 1e-6, act_eps: float = ACT_EPS, weight_eps: float = WEIGHT_EPS):
    """``ternarize_absmean(weight)`` (per tensor) and the forward quantization of rows ``x`` [M, K] (SubLN RMSNorm
    first when ``norm_weight`` is given), in two launches instead of three -> (weight codes int8 [N, K], weight scale
    fp32 [], x codes int8 [M, K], x scale fp32 [M], 1/rms fp32 [M] or None without SubLN)."""
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must be [out_features, in_features] with in_features = x's last dimension "
                         f"({x.shape[-1]}), got {tuple(weight.shape)}")
    x2 = as_rows(x)
    m, n = x2.shape
    tiling = row_tiling(n)
    if tiling.tail or tiling.chunked:  # long rows: the separate launches were faster (module docstring)
        return (*ternarize_absmean(weight, False, weight_eps), *quantize_input(x2, norm_weight, norm_eps, act_eps))
    flat = weight if weight.is_contiguous() else weight.contiguous()
    norm_weight = None if norm_weight is None else norm_weight.contiguous()
    device = x.device
    w_codes = torch.empty(weight.shape, device=device, dtype=torch.int8)
    w_scale = torch.empty((), device=device, dtype=torch.float32)
    codes = torch.empty(x2.shape, device=device, dtype=torch.int8)
    scale = torch.empty(m, device=device, dtype=torch.float32)
    rstd = torch.empty(m, device=device, dtype=torch.float32) if norm_weight is not None else None
    # x's tiling picks the warps (the weight scale does not depend on them); weight blocks of 32 elements a thread,
    # as many a program as the standalone codes pass takes of its own
    w_block = 1024 * tiling.num_warps
    numel = flat.numel()
    w_chunks = codes_chunks(numel, w_block)
    w_programs = max(cdiv(numel, w_block * w_chunks), 1)  # >= 1: it writes an empty weight's scale
    with on_device(x):
        partials = abs_sum_partials(flat)
        n_partials = partials.numel()
        launch(_ternarize_and_quantize_kernel, (w_programs + cdiv(m, tiling.rows),),
               flat, w_codes, partials, w_scale, numel, n_partials, weight_eps, w_programs,
               x2, scale if norm_weight is None else norm_weight, codes, scale, scale if rstd is None else rstd,
               m, n, x2.stride(0), codes.stride(0), norm_eps, act_eps,
               W_BLOCK=w_block, W_CHUNKS=w_chunks, PARTIALS=next_power_of_2(n_partials), BLOCK_N=tiling.block_n,
               ROWS=tiling.rows, NORM=norm_weight is not None, num_warps=tiling.num_warps, enable_fp_fusion=False)
    return w_codes, w_scale, codes, scale, rstd


def ternarize_and_quantize(weight: torch.Tensor, x: torch.Tensor, norm_weight: torch.Tensor | None = None,
                           norm_eps: float = 1e-6, act_eps: float = ACT_EPS, weight_eps: float = WEIGHT_EPS):
    """``weight`` [N, K], ``x`` [..., K] -> (weight codes, weight scale [], x codes [..., K], x scale [...]): what
    ``ternarize_absmean(weight)`` and ``quantize_activations_int8(x)`` (or ``rmsnorm_quantize_int8(x, norm_weight)``)
    return, in one launch less."""
    w_codes, w_scale, codes, scale, _ = ternarize_and_quantize_forward(
        weight.detach(), x.detach(), None if norm_weight is None else norm_weight.detach(), norm_eps, act_eps,
        weight_eps)
    return w_codes, w_scale, codes.reshape(x.shape), scale.reshape(x.shape[:-1])

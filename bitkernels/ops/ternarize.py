"""Absmean ternarization of weights (BitNet b1.58): codes in {-1, 0, 1} and one float32 scale (or one per row).

Per-tensor: a two-stage reduction entirely on the GPU (no host sync): a fixed number of programs write partial
sums of |w| (deterministic, no atomics), then every quantizing program reads the few partials and derives the scale.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._base import WEIGHT_EPS, as_rows
from ._common import cast_to, cdiv, next_power_of_2, on_device, round_half_to_even, row_block
from ._launch import launch

# Tuning (bench/notes/bitlinear.md, "Tuning record"):
BLOCK = 4096  # elements a block of the |w| partial sums and of the per-tensor codes pass (both at 8 warps)
MAX_PARTIALS = 1024  # partial sums of |w|: few enough that every codes program re-adds them in one block reduction
MIN_CODES_PROGRAMS = 256  # codes programs of several blocks (codes_chunks) only while at least this many remain


@triton.jit
def _abs_sum_partials_kernel(w_ptr, partial_ptr, numel, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    step = tl.num_programs(0).to(tl.int64) * BLOCK
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(pid.to(tl.int64) * BLOCK, numel, step):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.abs(tl.load(w_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32))
    tl.store(partial_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def ternary_codes(w, scale, DEQUANTIZE: tl.constexpr):
    # div_rn: the codes flip at |w| = scale/2, so the reciprocal must be IEEE-exact like the reference's.
    q = tl.minimum(tl.maximum(round_half_to_even(w * tl.math.div_rn(1.0, scale)), -1.0), 1.0)
    if DEQUANTIZE:
        q = q * scale
    return q


@triton.jit
def absmean_from_partials(partial_ptr, n_partials, numel, eps, PARTIALS: tl.constexpr):
    """max(sum of the partial sums of |w| / numel, eps), the same whatever the launch. A float sum's order follows the
    launch's layout: in x's launch (``ternarize_and_quantize``) some weights got a scale an ulp away from ternarize's
    own (bench/notes/bitlinear.md, "Tuning record"). So the partials are added as integers
    (associative): in fixed point, 52 bits below the largest one's exponent (a partial 2^28 times smaller still keeps
    all its bits), then rounded once."""
    p = tl.arange(0, PARTIALS)
    partials = tl.load(partial_ptr + p, mask=p < n_partials, other=0.0)
    float_sum = tl.sum(partials, axis=0)  # order-dependent: kept only where not finite (inf / nan weights)
    finite = (float_sum == float_sum) & (float_sum < float("inf"))
    top = tl.max(tl.where(finite, partials, 0.0), axis=0)  # >= 0
    exponent = tl.maximum(((top.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -126)
    to_fixed = ((1075 - exponent).to(tl.int64) << 52).to(tl.float64, bitcast=True)  # 2^(52 - exponent), exact
    from_fixed = ((971 + exponent).to(tl.int64) << 52).to(tl.float64, bitcast=True)  # 2^(exponent - 52)
    fixed = (tl.where(finite, partials, 0.0).to(tl.float64) * to_fixed).to(tl.int64)  # each < 2^53
    total = tl.where(finite, (tl.sum(fixed, axis=0).to(tl.float64) * from_fixed).to(tl.float32), float_sum)
    return tl.maximum(total / numel, eps)


@triton.jit
def ternarize_tensor_block(pid, n_programs, w_ptr, out_ptr, partial_ptr, scale_ptr, numel, n_partials, eps,
                           BLOCK: tl.constexpr, CHUNKS: tl.constexpr, PARTIALS: tl.constexpr,
                           DEQUANTIZE: tl.constexpr):
    """Program ``pid`` of ``n_programs`` of the per-tensor codes pass: the scale from the partial sums of |w|, then
    CHUNKS blocks of BLOCK codes. A helper so that ``ternarize_and_quantize`` runs it beside the activations'
    quantization."""
    scale = absmean_from_partials(partial_ptr, n_partials, numel, eps, PARTIALS)
    if pid == 0:
        tl.store(scale_ptr, scale)
    # Blocks last to first: the partial sums' grid-stride loops read the last blocks last, so the programs that start
    # first find them in L2 (faster in an A/B and a sweep: bench/notes/bitlinear.md, "Tuning record").
    for c in tl.static_range(CHUNKS):
        offs = ((n_programs - pid) * CHUNKS - 1 - c).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        q = ternary_codes(w, scale, DEQUANTIZE)
        tl.store(out_ptr + offs, cast_to(q, out_ptr.dtype.element_ty), mask=mask)


def codes_chunks(numel: int, block: int) -> int:
    """Blocks a codes program takes: each program first adds up the partial sums (``absmean_from_partials``: three
    block reductions), so larger weights take fewer, longer programs, as long as MIN_CODES_PROGRAMS remain (faster
    at every measured weight shape: bench/notes/bitlinear.md, "Tuning record")."""
    for chunks in (4, 2):
        if numel >= MIN_CODES_PROGRAMS * chunks * block:
            return chunks
    return 1


@triton.jit
def _ternarize_tensor_kernel(w_ptr, out_ptr, partial_ptr, scale_ptr, numel, n_partials, eps,
                             BLOCK: tl.constexpr, CHUNKS: tl.constexpr, PARTIALS: tl.constexpr,
                             DEQUANTIZE: tl.constexpr):
    ternarize_tensor_block(tl.program_id(0), tl.num_programs(0), w_ptr, out_ptr, partial_ptr, scale_ptr, numel,
                           n_partials, eps, BLOCK, CHUNKS, PARTIALS, DEQUANTIZE)


@triton.jit
def _ternarize_rows_kernel(w_ptr, out_ptr, scale_ptr, n_rows, n_cols, stride_w, stride_out, eps,
                           BLOCK_N: tl.constexpr, ROWS: tl.constexpr, DEQUANTIZE: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols[None, :] < n_cols)
    w = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.sum(tl.abs(w), axis=1) / n_cols, eps)
    tl.store(scale_ptr + rows, scale, mask=row_mask)
    q = ternary_codes(w, scale[:, None], DEQUANTIZE)
    out_ptrs = out_ptr + rows[:, None] * stride_out + cols[None, :]
    tl.store(out_ptrs, cast_to(q, out_ptr.dtype.element_ty), mask=mask)


def abs_sum_partials(flat: torch.Tensor) -> torch.Tensor:
    """First pass of the per-tensor scale over contiguous ``flat`` (launched on the current device): -> fp32 partial
    sums of |w|, at most MAX_PARTIALS (one for an empty tensor), which the codes pass adds up."""
    n_partials = max(1, min(cdiv(flat.numel(), BLOCK), MAX_PARTIALS))
    partials = torch.empty(n_partials, device=flat.device, dtype=torch.float32)
    launch(_abs_sum_partials_kernel, (n_partials,), flat, partials, flat.numel(), BLOCK=BLOCK, num_warps=8)
    return partials


def _ternarize(w: torch.Tensor, per_channel: bool, eps: float, dequantize: bool):
    out_dtype = w.dtype if dequantize else torch.int8
    if per_channel:
        w2 = as_rows(w)
        m, n = w2.shape
        out = torch.empty(w2.shape, device=w.device, dtype=out_dtype)
        scale = torch.empty(m, device=w.device, dtype=torch.float32)
        if m > 0:
            block_n, rows, num_warps = row_block(n, "weight")
            with on_device(w):
                launch(_ternarize_rows_kernel, (cdiv(m, rows),),
                       w2, out, scale, m, n, w2.stride(0), out.stride(0), eps,
                       BLOCK_N=block_n, ROWS=rows, DEQUANTIZE=dequantize, num_warps=num_warps,
                       enable_fp_fusion=False)
        return out, scale
    flat = w if w.is_contiguous() else w.contiguous()  # the kernels index it flat
    numel, device = flat.numel(), w.device
    out = torch.empty(w.shape, device=device, dtype=out_dtype)
    scale = torch.empty((), device=device, dtype=torch.float32)
    chunks = codes_chunks(numel, BLOCK)
    with on_device(w):
        partials = abs_sum_partials(flat)
        n_partials = partials.numel()
        launch(_ternarize_tensor_kernel, (max(cdiv(numel, BLOCK * chunks), 1),),  # >= 1: writes an empty one's scale
               flat, out, partials, scale, numel, n_partials, eps,
               BLOCK=BLOCK, CHUNKS=chunks, PARTIALS=next_power_of_2(n_partials), DEQUANTIZE=dequantize, num_warps=8,
               enable_fp_fusion=False)
    return out, scale


def ternarize_absmean(w: torch.Tensor, per_channel: bool = False, eps: float = WEIGHT_EPS):
    """``w`` -> (int8 codes in {-1, 0, 1}, float32 scale max(mean|w|, eps): shape [] or [rows] if per_channel)."""
    return _ternarize(w, per_channel, eps, dequantize=False)  # reads w's memory alone: nothing to detach


class FakeQuantizeWeight(torch.autograd.Function):
    """Forward: codes * scale in w's dtype. Backward: identity (straight-through estimator)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, per_channel: bool, eps: float):
        return _ternarize(w, per_channel, eps, dequantize=True)[0]

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return grad_out, None, None


def fake_quantize_weight(w: torch.Tensor, per_channel: bool = False, eps: float = WEIGHT_EPS) -> torch.Tensor:
    return FakeQuantizeWeight.apply(w, per_channel, eps)

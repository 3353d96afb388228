"""Attention-relation KL (MiniLM-v2 / BitDistill Stage 3) as flash-style Triton kernels: never an L x L tensor.

Per relation head h of width d (teacher d_t, student d_s), with z = A_h A_h^T / sqrt(d) and P = softmax_rows(z):

    KL_i = sum_j Pt_ij (log Pt_ij - log Ps_ij) = (sum_j e^{zt_ij - mt_i} (zt_ij - zs_ij)) / lt_i - lse_t_i + lse_s_i

so ONE pass over key tiles with two online log-sum-exps (teacher, student) and one rescaled accumulator gives the row's
KL; the forward keeps only the per-row log-sum-exps [B, R, L] for the backward. Everything runs in base 2 (exp2,
scores pre-multiplied by log2(e)) and is converted back to nats at the end.

Backward, student only (the teacher is detached). With w_i = dloss/dKL_i (grad / (R * N_real) for real queries, else
0), dz_ij = w_i (Ps_ij - Pt_ij), and since z = A A^T / sqrt(d) is symmetric,

    dA_i = (1 / sqrt(d_s)) * sum_j (dz_ij + dz_ji) A_j.

Symmetry also gives z_ji = z_ij, so the program that owns rows i recomputes the tile z[i, j] once and forms both
dz_ij (with the row statistics of i) and dz_ji (with the row statistics of j) elementwise: 2 score products + 1
gradient product per tile pair, no atomics, each program writes its own rows of dA.

Up to three relations of equal shapes (Q, K, V) run in one launch per direction (grid axis 2 picks the relation):
at B * L ~ 8K tokens one relation is a fraction of a wave of a 132-SM GPU and its launch costs as much as its work.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ..backend import triton_interpreter_enabled
from .._base import as_tokens_by_features
from ._common import AUTOTUNE, cast_to, cdiv, next_power_of_2, on_device

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)
# Finite running-max start: a tile whose keys are all masked then gives exp2(-inf - M_INIT) = 0, never inf - inf.
M_INIT = tl.constexpr(-1.0e30)
MAX_HEAD_DIM = 256  # query tiles of both models stay on chip; wider relation heads take backend='torch'
SHARED_MEMORY_MARGIN = 8 * 1024  # below the device's per-block limit: Triton's layout-conversion scratch
MAX_RELATIONS_PER_LAUNCH = 3  # Q, K, V: the kernels take three pointer pairs and select one per program
HOPPER_SHARED_MEMORY = 232448  # sm_90's per-block opt-in limit, used when torch does not report the device's


def _configs(block_pairs):
    if triton_interpreter_enabled():  # the interpreter runs each config: one, small, so tests cross tile edges
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in block_pairs]


@functools.lru_cache(maxsize=None)
def _shared_memory_budget(device: torch.device) -> int:
    if device.type != "cuda":  # pruning checked on the CPU: Hopper's limit
        return HOPPER_SHARED_MEMORY - SHARED_MEMORY_MARGIN
    props = torch.cuda.get_device_properties(device)  # a tensor's CUDA device always carries its index
    return getattr(props, "shared_memory_per_block_optin", HOPPER_SHARED_MEMORY) - SHARED_MEMORY_MARGIN


def shared_memory_estimate(block_m: int, block_n: int, num_stages: int, row_bytes: int, fp32: bool) -> int:
    """Bytes of shared memory a config takes, as Triton 3.6 allocates them on Hopper (measured per config at
    d = 64..256, bf16 and fp32, forward and backward): the resident query rows of both models + ``num_stages`` staged
    key tiles, each row ``row_bytes`` = d_t * size + d_s * size wide. fp32 inputs run 3xTF32 dots, which keep the
    query tiles twice (high and low parts). The m x n fp32 tile and 1 KiB cover the scratch measured next to them."""
    return ((2 if fp32 else 1) * block_m + num_stages * block_n) * row_bytes + block_m * block_n * 4 + 1024


def _prune_by_shared_memory(configs, named_args, **kwargs):
    """Keep the configs that fit in the device's shared memory (fp32 inputs at d = 128 need ~4x the bf16 room); the
    last config is the small fallback, used only when nothing else fits. Untuned (BITKERNELS_AUTOTUNE=0): the first
    fitting config, so it must be a real bound, not a guess the autotuner's timing run would correct."""
    if len(configs) == 1:
        return configs
    t, s = named_args["T0"], named_args["S0"]
    # older Triton versions pass no kwargs here: assume the widest heads then
    row_bytes = (kwargs.get("BLOCK_DT", MAX_HEAD_DIM) * t.element_size()
                 + kwargs.get("BLOCK_DS", MAX_HEAD_DIM) * s.element_size())
    fp32 = t.dtype == torch.float32 or s.dtype == torch.float32
    budget = _shared_memory_budget(s.device)
    fitting = [c for c in configs[:-1] if shared_memory_estimate(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"],
                                                                  c.num_stages, row_bytes, fp32) <= budget]
    if not AUTOTUNE:
        fitting = fitting[:1]
    return fitting or configs[-1:]


# (BLOCK_M, BLOCK_N, num_warps, num_stages), the first one the untuned default, the last the small fallback. Two fp32
# score tiles [M, N] live at once next to the resident query tiles, and in the backward a [M, d_s] fp32 gradient
# accumulator: tiles past 128 x 64 spill registers at d = 128.
FWD_CONFIGS = _configs([(128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 2),
                        (32, 32, 4, 1)])
BWD_CONFIGS = _configs([(64, 64, 4, 2), (64, 64, 8, 2), (128, 64, 8, 2), (128, 32, 4, 2), (64, 32, 4, 2),
                        (32, 32, 4, 1)])
TUNED = dict(key=["L_BUCKET", "D_T", "D_S", "HAS_MASK", "CAUSAL"],
             prune_configs_by={"early_config_prune": _prune_by_shared_memory})
# No padding mask, no causal mask, L a multiple of both tiles: every score is visible, so the kernels skip all masking.
UNMASKED = triton.heuristics({"UNMASKED": lambda a: not a["HAS_MASK"] and not a["CAUSAL"]
                              and a["L"] % a["BLOCK_M"] == 0 and a["L"] % a["BLOCK_N"] == 0})


@triton.jit
def _load_rows(base, rows, stride_l, L, cols, D: tl.constexpr, INTERPRETED: tl.constexpr):
    x = tl.load(base + rows[:, None] * stride_l + cols[None, :], mask=(rows[:, None] < L) & (cols[None, :] < D),
                other=0.0)
    if INTERPRETED:  # the interpreter's bf16 tl.dot returns garbage: give it exact fp32 copies instead
        x = x.to(tl.float32)
    return x


@triton.jit
def _round_to(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """fp32 -> ``dtype`` rounding to nearest even on every backend (the interpreter's own cast truncates bf16)."""
    if INTERPRETED:
        return cast_to(x, dtype).to(tl.float32)
    return x.to(dtype)


@triton.jit
def _pick(rel, x0, x1, x2):
    """The relation ``rel``'s pointer (or scalar): lowers to two selects, no branch."""
    x = x0
    if rel == 1:
        x = x1
    if rel == 2:
        x = x2
    return x


@triton.jit
def _real_tokens(MASK, b, stride_mb, offs, L, HAS_MASK: tl.constexpr):
    real = offs < L
    if HAS_MASK:
        real = real & (tl.load(MASK + b * stride_mb + offs, mask=offs < L, other=0) != 0)
    return real


@triton.autotune(configs=FWD_CONFIGS, **TUNED)
@UNMASKED
@triton.jit
def _attention_relation_fwd_kernel(
    T0, T1, T2, S0, S1, S2, MASK, KL_ROWS, LSE_T, LSE_S,
    stride_tb, stride_tl, stride_sb, stride_sl, stride_mb,
    L, L_BUCKET, R, scale_t, scale_s,
    D_T: tl.constexpr, D_S: tl.constexpr, BLOCK_DT: tl.constexpr, BLOCK_DS: tl.constexpr,
    PREC_T: tl.constexpr, PREC_S: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UNMASKED: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    rel = tl.program_id(2)  # Q, K, V of one shape share a launch: one wave of programs instead of three
    b = pid_bh // R
    r = pid_bh % R
    t_base = _pick(rel, T0, T1, T2) + b.to(tl.int64) * stride_tb + r * D_T
    s_base = _pick(rel, S0, S1, S2) + b.to(tl.int64) * stride_sb + r * D_S
    stats = (rel * tl.num_programs(1) + pid_bh).to(tl.int64) * L  # row offset in the [G, B, R, L] statistics
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_t = tl.arange(0, BLOCK_DT)
    cols_s = tl.arange(0, BLOCK_DS)
    q_t = _load_rows(t_base, offs_m, stride_tl, L, cols_t, D_T, INTERPRETED)
    q_s = _load_rows(s_base, offs_m, stride_sl, L, cols_s, D_S, INTERPRETED)
    query_real = _real_tokens(MASK, b, stride_mb, offs_m, L, HAS_MASK)

    m_t = tl.full([BLOCK_M], M_INIT, tl.float32)
    l_t = tl.zeros([BLOCK_M], tl.float32)
    m_s = tl.full([BLOCK_M], M_INIT, tl.float32)
    l_s = tl.zeros([BLOCK_M], tl.float32)
    cross = tl.zeros([BLOCK_M], tl.float32)  # sum_j e^{zt - m_t} (zt - zs), rescaled with the teacher's max
    hi = L
    if CAUSAL:
        hi = tl.minimum(L, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_t = _load_rows(t_base, offs_n, stride_tl, L, cols_t, D_T, INTERPRETED)
        k_s = _load_rows(s_base, offs_n, stride_sl, L, cols_s, D_S, INTERPRETED)
        zt = tl.dot(q_t, tl.trans(k_t), input_precision=PREC_T) * scale_t  # log2 units
        zs = tl.dot(q_s, tl.trans(k_s), input_precision=PREC_S) * scale_s
        if UNMASKED:
            diff = zt - zs
        else:
            visible = _real_tokens(MASK, b, stride_mb, offs_n, L, HAS_MASK)[None, :]
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None])
            diff = tl.where(visible, zt - zs, 0.0)  # before the -inf fill: no inf - inf
            zt = tl.where(visible, zt, float("-inf"))
            zs = tl.where(visible, zs, float("-inf"))

        m_t_new = tl.maximum(m_t, tl.max(zt, 1))
        alpha_t = tl.exp2(m_t - m_t_new)
        p_t = tl.exp2(zt - m_t_new[:, None])
        l_t = l_t * alpha_t + tl.sum(p_t, 1)
        cross = cross * alpha_t + tl.sum(p_t * diff, 1)
        m_t = m_t_new

        m_s_new = tl.maximum(m_s, tl.max(zs, 1))
        l_s = l_s * tl.exp2(m_s - m_s_new) + tl.sum(tl.exp2(zs - m_s_new[:, None]), 1)
        m_s = m_s_new

    # A row that saw a key has l >= 1 (its max term is exp2(0)); l = 0 only on rows dropped below.
    l_t = tl.maximum(l_t, 1.0)
    l_s = tl.maximum(l_s, 1.0)
    lse_t = m_t + tl.log2(l_t)
    lse_s = m_s + tl.log2(l_s)
    kl = (cross / l_t - lse_t + lse_s) * LN2
    row = stats + offs_m
    in_range = offs_m < L
    tl.store(KL_ROWS + row, tl.where(query_real, kl, 0.0), mask=in_range)
    # +inf for padded queries: the backward's exp2(z - lse) is then 0 on their rows, whatever their keys.
    tl.store(LSE_T + row, tl.where(query_real, lse_t, float("inf")), mask=in_range)
    tl.store(LSE_S + row, tl.where(query_real, lse_s, float("inf")), mask=in_range)


@triton.autotune(configs=BWD_CONFIGS, **TUNED)
@UNMASKED
@triton.jit
def _attention_relation_bwd_kernel(
    T0, T1, T2, S0, S1, S2, MASK, LSE_T, LSE_S, COEF, DS,
    stride_tb, stride_tl, stride_sb, stride_sl, stride_mb, stride_dg, stride_db, stride_dl,
    L, L_BUCKET, R, scale_t, scale_s, sm_scale_s,
    D_T: tl.constexpr, D_S: tl.constexpr, BLOCK_DT: tl.constexpr, BLOCK_DS: tl.constexpr,
    PREC_T: tl.constexpr, PREC_S: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UNMASKED: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    rel = tl.program_id(2)  # Q, K, V of one shape share a launch: one wave of programs instead of three
    b = pid_bh // R
    r = pid_bh % R
    t_base = _pick(rel, T0, T1, T2) + b.to(tl.int64) * stride_tb + r * D_T
    s_base = _pick(rel, S0, S1, S2) + b.to(tl.int64) * stride_sb + r * D_S
    stats = (rel * tl.num_programs(1) + pid_bh).to(tl.int64) * L  # row offset in the [G, B, R, L] statistics
    coef = tl.load(COEF)  # dloss / dKL_i of a real query: grad_output / (R * N_real), read on device (no sync)
    out_scale = coef * sm_scale_s

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_t = tl.arange(0, BLOCK_DT)
    cols_s = tl.arange(0, BLOCK_DS)
    q_t = _load_rows(t_base, offs_m, stride_tl, L, cols_t, D_T, INTERPRETED)
    q_s = _load_rows(s_base, offs_m, stride_sl, L, cols_s, D_S, INTERPRETED)
    real_m = _real_tokens(MASK, b, stride_mb, offs_m, L, HAS_MASK)
    lse_t_m = tl.load(LSE_T + stats + offs_m, mask=offs_m < L, other=float("inf"))
    lse_s_m = tl.load(LSE_S + stats + offs_m, mask=offs_m < L, other=float("inf"))

    acc = tl.zeros([BLOCK_M, BLOCK_DS], tl.float32)
    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_t = _load_rows(t_base, offs_n, stride_tl, L, cols_t, D_T, INTERPRETED)
        k_s = _load_rows(s_base, offs_n, stride_sl, L, cols_s, D_S, INTERPRETED)
        real_n = _real_tokens(MASK, b, stride_mb, offs_n, L, HAS_MASK)
        lse_t_n = tl.load(LSE_T + stats + offs_n, mask=offs_n < L, other=float("inf"))
        lse_s_n = tl.load(LSE_S + stats + offs_n, mask=offs_n < L, other=float("inf"))
        zt = tl.dot(q_t, tl.trans(k_t), input_precision=PREC_T) * scale_t
        zs = tl.dot(q_s, tl.trans(k_s), input_precision=PREC_S) * scale_s
        # dz / coef. Rows i of this program as queries, tile columns j as keys: Ps_ij - Pt_ij. Columns j as queries,
        # rows i as keys (z_ji = z_ij): Ps_ji - Pt_ji. A padded or out-of-range query has lse = +inf, so its terms
        # are already 0; only key visibility is left to mask.
        dz_row = tl.exp2(zs - lse_s_m[:, None]) - tl.exp2(zt - lse_t_m[:, None])
        dz_col = tl.exp2(zs - lse_s_n[None, :]) - tl.exp2(zt - lse_t_n[None, :])
        if UNMASKED:
            dz = dz_row + dz_col
        elif CAUSAL:
            dz = (tl.where(real_n[None, :] & (offs_n[None, :] <= offs_m[:, None]), dz_row, 0.0)
                  + tl.where(real_m[:, None] & (offs_m[:, None] <= offs_n[None, :]), dz_col, 0.0))
        else:  # the row term needs key j real, the column term key i real; the other side's query is then real too
            dz = tl.where(real_m[:, None] & real_n[None, :], dz_row + dz_col, 0.0)
        acc += tl.dot(_round_to(dz, S0.dtype.element_ty, INTERPRETED), k_s, input_precision=PREC_S)

    d_ptrs = DS + rel.to(tl.int64) * stride_dg + b.to(tl.int64) * stride_db + r * D_S + offs_m[:, None] * stride_dl + cols_s[None, :]
    tl.store(d_ptrs, _round_to(acc * out_scale, DS.dtype.element_ty, INTERPRETED),
             mask=(offs_m[:, None] < L) & (cols_s[None, :] < D_S))


def _dot_precision(t: torch.Tensor) -> str:
    # fp32 inputs: 3xTF32 on the tensor cores keeps scores near fp32 accuracy; fp16/bf16 ignore this.
    return "tf32x3" if t.dtype == torch.float32 else "tf32"


def _head_block(d: int) -> int:
    return max(16, next_power_of_2(d))  # tl.dot needs K >= 16


def _launch_meta(a_teacher, a_student, num_relation_heads):
    d_t = a_teacher.shape[-1] // num_relation_heads
    d_s = a_student.shape[-1] // num_relation_heads
    if max(d_t, d_s) > MAX_HEAD_DIM:
        raise ValueError(f"relation heads of width {max(d_t, d_s)} (D / num_relation_heads) exceed the Triton kernels' "
                         f"{MAX_HEAD_DIM}; use more relation heads or backend='torch'")
    return dict(
        D_T=d_t, D_S=d_s, BLOCK_DT=_head_block(d_t), BLOCK_DS=_head_block(d_s),
        PREC_T=_dot_precision(a_teacher), PREC_S=_dot_precision(a_student),
        INTERPRETED=triton_interpreter_enabled(),
    ), d_t, d_s


def _three(tensors):
    """Pointer arguments of up to three relations; unused slots repeat the first (never read)."""
    if not 1 <= len(tensors) <= MAX_RELATIONS_PER_LAUNCH:
        raise ValueError(f"one launch takes 1 to {MAX_RELATIONS_PER_LAUNCH} relations, got {len(tensors)}")
    return [*tensors, *[tensors[0]] * (MAX_RELATIONS_PER_LAUNCH - len(tensors))]


def _unit_col_stride(a: torch.Tensor) -> torch.Tensor:
    return a if a.stride(-1) == 1 else a.contiguous()


def attention_relation_forward(teachers, students, num_relation_heads, mask, causal):
    """Relations of one launch (same shapes and strides) -> (per-row KL [G, B, R, L] fp32 in nats, 0 on padded
    queries; lse_t, lse_s [G, B, R, L] base 2)."""
    t0, s0 = teachers[0], students[0]
    num_rel, (batch, length) = len(students), s0.shape[:2]
    kl_rows = torch.empty(num_rel, batch, num_relation_heads, length, device=s0.device, dtype=torch.float32)
    lse_t = torch.empty_like(kl_rows)
    lse_s = torch.empty_like(kl_rows)
    if kl_rows.numel() == 0:
        return kl_rows, lse_t, lse_s
    meta, d_t, d_s = _launch_meta(t0, s0, num_relation_heads)
    grid = lambda m: (cdiv(length, m["BLOCK_M"]), batch * num_relation_heads, num_rel)  # noqa: E731
    with on_device(s0):
        _attention_relation_fwd_kernel[grid](
            *_three(teachers), *_three(students), mask if mask is not None else kl_rows, kl_rows, lse_t, lse_s,
            t0.stride(0), t0.stride(1), s0.stride(0), s0.stride(1), mask.stride(0) if mask is not None else 0,
            length, next_power_of_2(length), num_relation_heads,
            LOG2E / math.sqrt(d_t), LOG2E / math.sqrt(d_s),
            HAS_MASK=mask is not None, CAUSAL=causal, **meta,
        )
    return kl_rows, lse_t, lse_s


def attention_relation_backward(teachers, students, num_relation_heads, mask, causal, lse_t, lse_s, coef):
    """dloss/d(each student) as one [G, B, L, D_s] tensor in the students' dtype; ``coef`` is a 0-d fp32 tensor
    grad / (R * N_real)."""
    t0, s0 = teachers[0], students[0]
    num_rel, (batch, length) = len(students), s0.shape[:2]
    grad = torch.empty((num_rel, *s0.shape), device=s0.device, dtype=s0.dtype)
    if grad.numel() == 0:
        return grad
    meta, d_t, d_s = _launch_meta(t0, s0, num_relation_heads)
    grid = lambda m: (cdiv(length, m["BLOCK_M"]), batch * num_relation_heads, num_rel)  # noqa: E731
    with on_device(s0):
        _attention_relation_bwd_kernel[grid](
            *_three(teachers), *_three(students), mask if mask is not None else lse_t, lse_t, lse_s, coef, grad,
            t0.stride(0), t0.stride(1), s0.stride(0), s0.stride(1), mask.stride(0) if mask is not None else 0,
            grad.stride(0), grad.stride(1), grad.stride(2),
            length, next_power_of_2(length), num_relation_heads,
            LOG2E / math.sqrt(d_t), LOG2E / math.sqrt(d_s), 1.0 / math.sqrt(d_s),
            HAS_MASK=mask is not None, CAUSAL=causal, **meta,
        )
    return grad


class AttentionRelationKL(torch.autograd.Function):
    """Sum over G <= 3 relations of the same shapes and strides (Q, K, V of equal widths: one launch per direction)
    of each relation's scalar KL of [B, L, D] activations; gradients for the students only.
    ``apply(num_relation_heads, mask, causal, *teachers, *students)``."""

    @staticmethod
    def forward(ctx, num_relation_heads, mask, causal, *tensors):
        num_rel = len(tensors) // 2
        teachers, students = tensors[:num_rel], tensors[num_rel:]
        kl_rows, lse_t, lse_s = attention_relation_forward(teachers, students, num_relation_heads, mask, causal)
        batch, length = students[0].shape[0], students[0].shape[1]
        if mask is not None:  # counted on the device: no host sync
            denom = mask.sum().clamp_min(1).to(torch.float32) * num_relation_heads
        else:
            denom = float(max(batch * length, 1) * num_relation_heads)
        ctx.save_for_backward(mask, lse_t, lse_s, denom if isinstance(denom, torch.Tensor) else None, *tensors)
        ctx.denom = denom if not isinstance(denom, torch.Tensor) else None
        ctx.num_relation_heads, ctx.causal, ctx.num_rel = num_relation_heads, causal, num_rel
        return kl_rows.sum() / denom

    @staticmethod
    def backward(ctx, grad_output):
        mask, lse_t, lse_s, denom, *tensors = ctx.saved_tensors
        denom = ctx.denom if denom is None else denom
        coef = (grad_output.to(torch.float32) / denom).reshape(1)
        teachers, students = tensors[:ctx.num_rel], tensors[ctx.num_rel:]
        grad = attention_relation_backward(teachers, students, ctx.num_relation_heads, mask, ctx.causal,
                                           lse_t, lse_s, coef)
        return (None, None, None, *[None] * ctx.num_rel, *grad.unbind(0))


def _kernel_mask(attention_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    if attention_mask is None:
        return None
    return (attention_mask.to(device) != 0).to(torch.int32).contiguous()


def _kernel_layout(a: torch.Tensor) -> torch.Tensor:
    return _unit_col_stride(as_tokens_by_features(a))


def attention_relation_kl(a_teacher: torch.Tensor, a_student: torch.Tensor, num_relation_heads: int,
                          attention_mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    """Triton twin of ``bitkernels.reference.attention_relation_kl`` (same layouts, normalization, result dtype
    float32). Memory beyond the inputs: three fp32 [B, R, L] vectors and the student gradient."""
    s = _kernel_layout(a_student)
    t = _kernel_layout(a_teacher.detach())
    return AttentionRelationKL.apply(num_relation_heads, _kernel_mask(attention_mask, s.device), bool(causal), t, s)


def attention_relation_distill_loss(qkv_teacher, qkv_student, num_relation_heads: int,
                                    attention_mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    """Mean of ``attention_relation_kl`` over the (Q, K, V) relations. Relations whose teacher and student tensors
    have equal shapes, strides and dtypes share one launch per direction (all three in MHA; Q alone and K with V
    under GQA), which fills the GPU with one wave instead of three short ones at small B * L."""
    pairs = [(_kernel_layout(t.detach()), _kernel_layout(s)) for t, s in zip(qkv_teacher, qkv_student)]
    mask = _kernel_mask(attention_mask, pairs[0][1].device)
    groups: dict[tuple, list] = {}
    for t, s in pairs:
        key = (t.shape, t.stride(), t.dtype, s.shape, s.stride(), s.dtype)
        groups.setdefault(key, []).append((t, s))
    total = None
    for members in groups.values():
        for i in range(0, len(members), MAX_RELATIONS_PER_LAUNCH):
            chunk = members[i:i + MAX_RELATIONS_PER_LAUNCH]
            part = AttentionRelationKL.apply(num_relation_heads, mask, bool(causal),
                                             *[t for t, _ in chunk], *[s for _, s in chunk])
            total = part if total is None else total + part
    return total / len(pairs)

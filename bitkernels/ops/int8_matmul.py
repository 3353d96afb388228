"""The forward GEMM of BitLinear.

``int8_matmul`` multiplies int8 activation codes [M, K] by int8 ternary weight codes [N, K] on the integer tensor
cores (int32 accumulation, exact for K < 2**17) and applies the per-token scale, the weight scale (per tensor or per
output channel) and the bias in the epilogue: one rounding to the output dtype, no int32 tensor in HBM. Two kernels
share that epilogue (same bits): on Hopper+ a persistent kernel fed by TMA descriptors (``prefer_tma`` picks it for
aligned operands and large enough GEMMs), elsewhere a pointer-arithmetic one. The backward GEMMs (float gradients
times dequantized codes) run on cuBLAS: see ``ops.bitlinear``.

Tuning: the config lists (``POINTER_TILES``, ``TMA_TILES``) and the TMA threshold (``TMA_MIN_MACS``) below, each with
its reason; the measurements behind them are in bench/notes/bitlinear.md, "Tuning record".
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import triton_interpreter_enabled
from ._common import AUTOTUNE, cast_to, cdiv, device_info, next_power_of_2, on_device
from ._launch import launch

try:  # the runtime allocator that device-side TMA descriptors need (Triton >= 3.4); without it, the pointer kernel
    from triton.runtime import _allocation
    HAS_DEVICE_TMA = hasattr(tl, "make_tensor_descriptor") and hasattr(_allocation, "NullAllocator")
except ImportError:  # pragma: no cover - depends on the Triton version
    _allocation, HAS_DEVICE_TMA = None, False


def config_list(tiles: list[tuple]) -> list[triton.Config]:
    """Configs from (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages[, PERSISTENT, TMA_STORE, PROGRAMS_PER_SM])
    tuples."""
    configs = []
    for bm, bn, bk, warps, stages, *tma_flags in tiles:
        meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}
        meta.update(zip(("PERSISTENT", "TMA_STORE", "PROGRAMS_PER_SM"), tma_flags))
        configs.append(triton.Config(meta, num_warps=warps, num_stages=stages))
    return configs


def _configs(tiles: list[tuple], interpreter_config: dict) -> list[triton.Config]:
    """The autotuner's configs: every tile, the first alone (the untuned default) under BITKERNELS_AUTOTUNE=0."""
    if triton_interpreter_enabled():  # the interpreter runs every config it is given: one small one keeps CPU tests fast
        return [triton.Config(interpreter_config, num_warps=4, num_stages=1)]
    configs = config_list(tiles)
    return configs if AUTOTUNE else configs[:1]


# Pointer kernel (any GPU, any strides). (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): 128x256 / 256x128 tiles
# with 8 warps (two warpgroups of wgmma) and 3-4 stages fit Hopper's 227 KB of shared memory; 128x128 and 64-row
# tiles for small M or N and for Ampere (whose 164 KB rejects the deepest configs at compile time, which the
# autotuner skips). The first fits both. 128x128x128 with one warpgroup at 3 stages leaves room for two programs an
# SM, whose epilogues and main loops then overlap (see TMA_TILES): it made the shapes that stay on this kernel faster.
POINTER_TILES = [
    (128, 256, 128, 8, 3), (256, 128, 128, 8, 3), (128, 128, 128, 8, 4), (128, 128, 128, 4, 4),
    (128, 256, 64, 8, 4), (64, 128, 128, 4, 4), (64, 256, 128, 4, 3), (128, 64, 128, 4, 4), (128, 128, 128, 4, 3),
]
_POINTER_CONFIGS = _configs(POINTER_TILES, {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 4})


# TMA kernel (Hopper+). (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, PERSISTENT, TMA_STORE, PROGRAMS_PER_SM):
# the 3-stage tiles won a sweep of tile shapes; the 4-stage ones, found by bench/tools/sweep_int8_gemm.py, are a few
# percent faster at 8192 tokens, also with the output stored through a descriptor in two column halves (TMA_STORE:
# faster than the same tile storing through pointers at small K, even at large K: the autotuner picks per shape).
# Two programs an SM (PROGRAMS_PER_SM=2, one warpgroup and a 128x128 tile each, 168-210 registers a thread and
# 106-115 KB of shared memory: two fit): one program's epilogue runs while the other's MMAs do, which a single
# program an SM cannot overlap (its warps both store and multiply). That saves time at K up to 2560 and at 2048
# tokens, and costs some at K=9728, where the 128x256 tiles' longer K loops amortize their epilogue and keep their
# edge.
# Shared memory: stages * (BLOCK_M + BLOCK_N) * BLOCK_K bytes of operand tiles (4 x 48 KiB at 128x256x128) plus what
# the epilogue stages (a whole tile staged for a TMA store beside 4 stages needs 262176 bytes of 232448; so does
# 256x128x128 at 4 stages storing through pointers when N is not a multiple of 16); configs that do not fit fail to
# compile and the autotuner drops them. The first is the untuned default (BITKERNELS_AUTOTUNE=0):
# it must fit and store through pointers (any output row alignment). A float32 output fits none (tma_output_ok).
TMA_TILES = [
    (128, 256, 128, 8, 3, True, False, 1), (256, 128, 128, 8, 3, True, False, 1), (128, 256, 128, 8, 4, True, False, 1),
    (256, 128, 128, 8, 4, True, False, 1), (128, 256, 128, 8, 4, True, True, 1), (256, 128, 128, 8, 4, True, True, 1),
    (128, 128, 256, 8, 3, True, False, 1), (128, 128, 256, 8, 3, False, False, 1),
    (128, 128, 128, 4, 3, True, True, 2), (128, 128, 128, 4, 3, True, False, 2),
]
_TMA_CONFIGS = _configs(TMA_TILES, {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 4, "PERSISTENT": True,
                                    "TMA_STORE": False, "PROGRAMS_PER_SM": 2})


def _prune_tma_store(configs, named_args, **kwargs):
    # A descriptor store needs 16-byte aligned output rows (N a multiple of 8 at 16 bits); other outputs keep the
    # pointer-store configs. N is in the tuning key, so each key prunes the same way every call.
    c = named_args["c_ptr"]
    aligned = (named_args["stride_cm"] * c.element_size()) % 16 == 0 and c.data_ptr() % 16 == 0
    return [cfg for cfg in configs if aligned or not cfg.kwargs.get("TMA_STORE", False)]


def _bucket(m: int) -> int:
    """Autotuning key for M: the next power of two, so a new batch size reuses its bucket's tuning."""
    return next_power_of_2(max(m, 1))


@triton.jit
def _tile_ids(tile_id, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped ordering: GROUP_M row-tiles share each column tile while it is in L2.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (tile_id // group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (tile_id % group) % group_m, (tile_id % group) // group_m


@triton.jit
def _scaled(acc, a_scale_ptr, b_scale_ptr, bias_ptr, offs_m, offs_n, M, N, PER_CHANNEL: tl.constexpr,
            HAS_BIAS: tl.constexpr):
    # int32 -> fp32 (exact below 2**24, i.e. |sum| < 127 * K for K < 132k), both scales, bias: the epilogue's
    # arithmetic in fp32, before its one rounding to the output dtype.
    m_mask = offs_m < M
    n_mask = offs_n < N
    a_scale = tl.load(a_scale_ptr + offs_m, mask=m_mask, other=0.0)
    if PER_CHANNEL:
        b_scale = tl.load(b_scale_ptr + offs_n, mask=n_mask, other=0.0)
        y = acc.to(tl.float32) * a_scale[:, None] * b_scale[None, :]
    else:
        y = acc.to(tl.float32) * (a_scale * tl.load(b_scale_ptr))[:, None]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit
def _scale_and_store(acc, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, offs_m, offs_n, M, N, stride_cm, stride_cn,
                     PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr):
    y = _scaled(acc, a_scale_ptr, b_scale_ptr, bias_ptr, offs_m, offs_n, M, N, PER_CHANNEL, HAS_BIAS)
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn
    tl.store(c_ptrs, cast_to(y, c_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


@triton.jit
def _scale_and_store_halves(acc, c_desc, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, off_m, off_n, M, N,
                            PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr):
    # The epilogue through a tensor descriptor with [BLOCK_M, BLOCK_N // 2] blocks, one column half at a time: the
    # same arithmetic as _scale_and_store; the copy engine clips rows and columns past M and N.
    BLOCK_M: tl.constexpr = acc.shape[0]
    HALF_N: tl.constexpr = acc.shape[1] // 2
    acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF_N)), (0, 2, 1)))
    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_n = off_n + tl.arange(0, HALF_N)
    y0 = _scaled(acc0, a_scale_ptr, b_scale_ptr, bias_ptr, offs_m, offs_n, M, N, PER_CHANNEL, HAS_BIAS)
    c_desc.store([off_m, off_n], cast_to(y0, c_ptr.dtype.element_ty))
    y1 = _scaled(acc1, a_scale_ptr, b_scale_ptr, bias_ptr, offs_m, offs_n + HALF_N, M, N, PER_CHANNEL, HAS_BIAS)
    c_desc.store([off_m, off_n + HALF_N], cast_to(y1, c_ptr.dtype.element_ty))


@triton.autotune(configs=_POINTER_CONFIGS, key=["M_KEY", "N", "K", "PER_CHANNEL", "HAS_BIAS"])
@triton.jit
def _int8_matmul_kernel(a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, M, N, K, M_KEY,
                        stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
                        PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
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
    _scale_and_store(acc, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, offs_m, offs_n, M, N, stride_cm, stride_cn,
                     PER_CHANNEL, HAS_BIAS)


@triton.autotune(configs=_TMA_CONFIGS, key=["M_KEY", "N", "K", "PER_CHANNEL", "HAS_BIAS"],
                 prune_configs_by={"early_config_prune": _prune_tma_store})
@triton.jit
def _int8_matmul_tma_kernel(a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, M, N, K, M_KEY,
                            stride_am, stride_bn, stride_cm, stride_cn, NUM_SMS: tl.constexpr,
                            PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            GROUP_M: tl.constexpr, PERSISTENT: tl.constexpr, TMA_STORE: tl.constexpr,
                            PROGRAMS_PER_SM: tl.constexpr):
    # Tiles arrive by the copy engine (TMA), which also zero-fills past M, N and K: no masks in the main loop. The
    # descriptors are built here, on the device, in the launch's scratch memory: host descriptors, which Triton's
    # launcher encodes on every call, cost more host time a call for the same GPU time. A persistent grid (one
    # program per SM walking tiles) with the tile and K loops flattened lets the next tile's loads overlap this
    # tile's epilogue, which made it faster than the pointer kernel. PROGRAMS_PER_SM such programs share each SM (see
    # TMA_TILES).
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_bn, 1], block_shape=[BLOCK_N, BLOCK_K])
    if TMA_STORE:  # in two column halves: half a tile of staging, which is what lets a 4th stage fit beside it
        c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[stride_cm, 1],
                                           block_shape=[BLOCK_M, BLOCK_N // 2])
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    if PERSISTENT:
        step = NUM_SMS * PROGRAMS_PER_SM
    else:  # one tile per program
        step = num_tiles
    # The epilogue finds its tile from a second counter rather than keeping the offsets from before the K loop across
    # the flattened loop's pipeline, as the sweep's kernel does (bench/tools/sweep_int8_gemm.py), where the 4-stage
    # tiles were measured.
    tile_id_c = tl.program_id(0) - step
    for tile_id in tl.range(tl.program_id(0), num_tiles, step, flatten=True):
        pid_m, pid_n = _tile_ids(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            a = a_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
            b = b_desc.load([pid_n * BLOCK_N, k * BLOCK_K])
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        tile_id_c += step
        pid_m, pid_n = _tile_ids(tile_id_c, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        if TMA_STORE:
            _scale_and_store_halves(acc, c_desc, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, pid_m * BLOCK_M,
                                    pid_n * BLOCK_N, M, N, PER_CHANNEL, HAS_BIAS)
        else:
            _scale_and_store(acc, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, pid_m * BLOCK_M + tl.arange(0, BLOCK_M),
                             pid_n * BLOCK_N + tl.arange(0, BLOCK_N), M, N, stride_cm, stride_cn, PER_CHANNEL, HAS_BIAS)


# key -> the chosen config's keywords, and every keyword of its launch (the call's constexprs, the config's and its
# options)
_TUNED: dict[tuple, tuple[dict, dict]] = {}


def _launch_autotuned(kernel, key: tuple, grid, args: tuple, constexprs: dict):
    """Launch an autotuned kernel; once ``key`` is tuned, launch its chosen config directly, skipping the autotuner's
    per-call dispatch (argument dicts, dtype strings, its key), a visible share of ``int8_matmul``'s host time; and
    through ``_launch.launch``, past the JIT function's own dispatch. ``key`` holds what the autotuner's key holds (M
    bucket, N, K, flags, dtypes) and so fixes ``constexprs``. ``grid`` takes the config's keywords."""
    tuned = _TUNED.get(key)
    if tuned is None:
        kernel[grid](*args, **constexprs)
        _TUNED[key] = (kernel.best_config.kwargs, {**constexprs, **kernel.best_config.all_kwargs()})
        return
    meta, launch_kwargs = tuned
    launch(kernel.fn, grid(meta), *args, **launch_kwargs)


def _scratch_from_torch(size: int, alignment: int, stream) -> torch.Tensor:
    # The launch's scratch (the device-side descriptors, 128 bytes each per program) from torch's caching allocator:
    # stream-ordered reuse, and a CUDA graph's private pool while one is captured. Blocks are 512-byte aligned, more
    # than the descriptors' alignment; the launch runs on the operands' device (on_device), the current one.
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_scratch_allocator() -> None:
    """Give Triton an allocator for kernel scratch memory unless one is set. The setting is a context variable: each
    thread (autograd's backward threads too, which rerun forwards under activation checkpointing) starts without one,
    so this runs before every TMA launch (a context-variable read when already set). A user's allocator is kept."""
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch_from_torch)


def tma_layout_ok(t: torch.Tensor) -> bool:
    """The copy engine's alignment: 16-byte base and row stride, unit column stride."""
    return t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0


def tma_eligible(*tensors: torch.Tensor) -> bool:
    """Whether the TMA kernel runs on these operands: Hopper or newer (sm_90+) and TMA-aligned layouts."""
    return HAS_DEVICE_TMA and all(
        t.is_cuda and device_info(t.device).capability[0] >= 9 and tma_layout_ok(t) for t in tensors)


# The TMA kernel takes less GPU time than the pointer kernel, but its launch costs more host time (the scratch
# allocation for its device-side descriptors): it pays where the GEMM's GPU time hides that, from ~2**35
# multiply-adds up. Checked again with the descriptor-store configs: just below (8192x1024x3072, 2048x2048x6144) the
# GPU time it saved was less than the host time it cost, and rows that small are host-bound. (Not switched on during
# CUDA-graph capture: the captured call would then take a kernel and tuning key its eager warm-up never tuned, and
# autotuning inside a capture breaks it.)
TMA_MIN_MACS = 2 ** 35


def tma_output_ok(out_dtype: torch.dtype) -> bool:
    """16-bit outputs only: a float32 output tile staged beside the TMA configs' pipelines needs more shared memory
    than Hopper has (measured 327712 bytes of 232448 at 256x128x128 x 4 stages; by the count above, over 262000 at
    every config here); float32 takes the pointer kernel."""
    return out_dtype.itemsize <= 2


def prefer_tma(a_codes: torch.Tensor, b_codes: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> bool:
    """The automatic choice of ``int8_matmul``: the TMA kernel where eligible and worth its host cost."""
    return (a_codes.shape[0] * a_codes.shape[1] * b_codes.shape[0] >= TMA_MIN_MACS and tma_output_ok(out_dtype)
            and tma_eligible(a_codes, b_codes))


def int8_matmul(a_codes: torch.Tensor, b_codes: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16, *,
                tma: bool | None = None) -> torch.Tensor:
    """``(a_codes @ b_codes^T) * a_scale[:, None] * b_scale + bias`` in ``out_dtype``.

    a_codes int8 [M, K] (activation codes), b_codes int8 [N, K] (weight codes, nn.Linear layout), a_scale fp32 [M],
    b_scale fp32 [] (per tensor) or [N] (per output channel), bias [N] or None. ``tma``: None lets ``prefer_tma``
    choose (Hopper+, aligned rows, a 16-bit output, a GEMM large enough), True/False force one kernel.
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
    bias_arg = bias if bias is not None else b_scale  # an unused pointer without bias
    with on_device(a_codes):
        if tma is None:
            tma = prefer_tma(a_codes, b_codes, out_dtype)
        elif tma and not (HAS_DEVICE_TMA and tma_layout_ok(a_codes) and tma_layout_ok(b_codes)):
            raise ValueError("tma=True needs Triton's device-side tensor descriptors (Triton >= 3.4) and operands with "
                             "a unit column stride and 16-byte aligned base and rows (K a multiple of 16 for "
                             "contiguous int8 codes)")
        elif tma and not tma_output_ok(out_dtype):
            raise ValueError(f"tma=True needs a 16-bit out_dtype (float16 or bfloat16), got {out_dtype}: the TMA "
                             "kernel's shared memory has no room for a float32 output tile; use tma=False or None")
        m_key, has_bias = _bucket(m), bias is not None
        key = (tma, m_key, n, k, per_channel, has_bias, bias_arg.dtype, out_dtype, a_codes.device)
        constexprs = dict(PER_CHANNEL=per_channel, HAS_BIAS=has_bias)
        if tma:
            sms = device_info(a_codes.device).sm_count
            _ensure_scratch_allocator()

            def grid(meta):
                tiles = cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"])
                return (min(tiles, sms * meta["PROGRAMS_PER_SM"]) if meta["PERSISTENT"] else tiles,)

            _launch_autotuned(_int8_matmul_tma_kernel, key, grid, (
                a_codes, b_codes, out, a_scale, b_scale, bias_arg, m, n, k, m_key, a_codes.stride(0),
                b_codes.stride(0), out.stride(0), out.stride(1)), dict(NUM_SMS=sms, **constexprs))
        else:
            grid = lambda meta: (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
            _launch_autotuned(_int8_matmul_kernel, key, grid, (
                a_codes, b_codes, out, a_scale, b_scale, bias_arg, m, n, k, m_key,
                a_codes.stride(0), a_codes.stride(1), b_codes.stride(0), b_codes.stride(1), out.stride(0),
                out.stride(1)), constexprs)
    return out

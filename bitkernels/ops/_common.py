"""Pieces shared by the Triton quantization kernels and their launchers.

The row-tiling constants below are the forward quantizers' tuning table; the measurements behind each choice are in
bench/notes/bitlinear.md, "Tuning record"."""
from __future__ import annotations

import contextlib
import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

MAX_ROW = 65536  # kernels that keep a row in registers refuse longer ones (backend='torch' takes them)
SINGLE_PASS_MAX = 8192  # forward quantizers keep rows up to this padded length in registers, else walk chunks
# ... or, past it, as a SINGLE_PASS_MAX-wide head tile plus a power-of-two tail tile while the two stay within
# SPLIT_ROW_MAX: 9728 columns pad to 10240 instead of 16384, faster than both three chunked passes and one padded
# tile (Tuning record, "row tiling").
SPLIT_ROW_MAX = 16384
SPLIT_ROW_WARPS = 8  # head+tail rows: 8 warps beat 4 and 16
CHUNK, CHUNK_WARPS = 2048, 8  # chunked rows: 2048-wide chunks beat 4096-wide ones
# Autotuned kernels (GEMMs, attention relation) try each config per new shape key. BITKERNELS_AUTOTUNE=0 takes the
# first (default) config without timing runs: tests over many random shapes then compile once instead of tuning each.
AUTOTUNE = os.environ.get("BITKERNELS_AUTOTUNE", "1") != "0"


# The interpreter has no libdevice: there the rounding is spelled out in float arithmetic (same bits). On the GPU the
# hardware instruction, because the spelled-out form made the SubLN+quant pass markedly slower (Tuning record).
_HARDWARE_RINT = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")


@triton.jit
def round_half_to_even(v):
    # Matches torch.round bit for bit: the GPU's round-to-nearest-even instruction, or its spelled-out equivalent.
    # Kernels that call it launch with enable_fp_fusion=False: fused into a multiply-subtract, the spelled-out form
    # would compare the unrounded product against the tie. Its frac/floor arithmetic is exact for |v| < 2**23.
    if _HARDWARE_RINT:
        return libdevice.rint(v)
    f = tl.floor(v)
    d = v - f
    f_is_odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where((d > 0.5) | ((d == 0.5) & f_is_odd), f + 1.0, f)


@triton.jit
def cast_to(y, dtype: tl.constexpr):
    """fp32 -> ``dtype`` rounding to nearest even. Triton's interpreter truncates fp32 -> bf16, so bf16 is rounded
    here by hand (bit-identical to the GPU's cvt.rn): kernel and reference then agree on every backend."""
    if dtype == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        y = bits.to(tl.float32, bitcast=True)
    return y.to(dtype)


# The current CUDA device's index. torch.cuda.current_device() wraps this in a Python lazy-init check that costs host
# time on every one of a BitLinear step's many calls. Callers hold CUDA tensors, so CUDA is initialized.
current_cuda_device = getattr(torch._C, "_cuda_getDevice", None) or torch.cuda.current_device


def on_device(t: torch.Tensor):
    """Launch on ``t``'s GPU, not whichever is current (switching only when they differ: entering
    ``torch.cuda.device`` costs several microseconds per launch, a visible share of a small layer's step)."""
    if not t.is_cuda or t.get_device() == current_cuda_device():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def cdiv(a: int, b: int) -> int:
    """Ceiling division on the host. ``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions whose
    wrapper costs host time on each call, and a BitLinear step's launchers make many."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (0 for 0), as ``triton.next_power_of_2``."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


class DeviceInfo(NamedTuple):
    sm_count: int
    capability: tuple[int, int]


_DEVICE_INFO: dict[int, DeviceInfo] = {}


def device_info(device: torch.device) -> DeviceInfo:
    """Multiprocessor count and compute capability of a CUDA device, cached (the property query costs host time on
    every call, a visible share of a small layer's launch overhead); (2, (0, 0)) elsewhere."""
    if device.type != "cuda":
        return DeviceInfo(2, (0, 0))
    index = device.index if device.index is not None else current_cuda_device()
    info = _DEVICE_INFO.get(index)
    if info is None:
        props = torch.cuda.get_device_properties(index)
        info = _DEVICE_INFO[index] = DeviceInfo(props.multi_processor_count, (props.major, props.minor))
    return info


class RowTiling(NamedTuple):
    block_n: int  # columns per register tile (the whole padded row, the head tile, or one chunk)
    rows: int  # rows per program
    num_warps: int
    chunked: bool  # walk the row in block_n-wide chunks (two or three passes, the later ones served by L2)
    tail: int = 0  # with a head tile of block_n columns, a second tile of this many (0: none)


@functools.lru_cache(maxsize=1024)  # runs on every launch of the quantizers: cached, a lookup instead of the logic
def row_tiling(n_cols: int) -> RowTiling:
    """Tiling of the forward quantizers: whole rows in registers when they fit (for rows just past SINGLE_PASS_MAX as
    a head and a tail tile, padding 9728 columns to 10240 instead of 16384), else CHUNK-wide chunks of one row."""
    if next_power_of_2(max(n_cols, 1)) <= SINGLE_PASS_MAX:
        return RowTiling(*row_block(n_cols), chunked=False)
    tail = next_power_of_2(n_cols - SINGLE_PASS_MAX)
    if SINGLE_PASS_MAX + tail <= SPLIT_ROW_MAX:
        return RowTiling(SINGLE_PASS_MAX, 1, SPLIT_ROW_WARPS, chunked=False, tail=tail)
    return RowTiling(CHUNK, 1, CHUNK_WARPS, chunked=True)


def check_row_length(n_cols: int, name: str = "x") -> None:
    """Refuse rows longer than the register-resident kernels take (before any work is launched)."""
    if n_cols > MAX_ROW:
        raise ValueError(f"{name} rows of {n_cols} elements exceed the Triton kernels' limit of {MAX_ROW}; "
                         "use backend='torch'")


@functools.lru_cache(maxsize=1024)
def row_block(n_cols: int, name: str = "x") -> tuple[int, int, int]:
    """(BLOCK_N, ROWS per program, num_warps) for row-wise kernels that keep whole rows in registers."""
    check_row_length(n_cols, name)
    block_n = next_power_of_2(max(n_cols, 1))
    rows = max(1, min(16, 4096 // block_n))  # short rows: several per program so each moves >= 4K elements
    # ~32 elements per thread: these memory-bound row kernels ran 1.2-3.5x faster than at 8 per thread (fewer,
    # busier warps: more loads in flight per thread, cheaper row reductions; Tuning record, "row_block")
    num_warps = min(16, max(1, rows * block_n // 1024))
    return block_n, rows, num_warps

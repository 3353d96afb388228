"""Sweep of int8 TMA GEMM variants against the shipped ``int8_matmul``: warp specialization, TMA-store epilogue,
epilogue split in two column halves. An experiment for what to ship next, not a shipped kernel.

    python bench/tools/sweep_int8_gemm.py [--compile-budget 240] [--out path.json]     # GPU: check and time
    TRITON_INTERPRET=1 python bench/tools/sweep_int8_gemm.py                           # CPU: check only, tiny shapes
    python bench/tools/sweep_int8_gemm.py --baseline old_int8_matmul.py                # also an earlier int8_matmul.py
    python bench/tools/sweep_int8_gemm.py --shapes 8192x1024x3072 --compile-budget 0   # other shapes; no variants
    python bench/tools/sweep_int8_gemm.py --set occupancy                              # two programs an SM

``--baseline``: a copy of an earlier ``bitkernels/ops/int8_matmul.py`` (``git show REV:bitkernels/ops/int8_matmul.py
> old.py``; the device machine gets no git history), checked bit for bit against the shipped kernel (with and without
bias) and timed beside it in the same process: the A/B for a change to the shipped kernel or its configs.

Why these: after v10 the int8 GEMM runs at 1.2-1.5x cuBLAS bf16 against a 2x ratio of peaks (bench/notes/HISTORY.md
"v11"). The shipped kernel is persistent with its tile and K loops flattened, so the next tile's loads overlap this
tile's epilogue, but one warpgroup pair both issues the loads and does the math, and its epilogue stores through
registers with an output tile staged beside the pipeline (which keeps out 4-stage configs). Variants (constexprs):
    WS         tl.range(..., warp_specialize=True): producer / consumer warps (Triton's Hopper pass, where present)
    FLATTEN    tile and K loops flattened (the shipped kernel's choice)
    TMA_STORE  the epilogue stores through a tensor descriptor (asynchronous copy engine)
    SUBTILE    the epilogue in two BLOCK_N/2 halves: half the staging buffer, room for a 4th stage
Every variant must equal the shipped kernel bit for bit (same epilogue arithmetic) before it is timed; a variant
that fails to compile is reported and skipped. Since v13 the shipped kernel itself tunes over the 4-stage tiles and the
two-half TMA-store epilogue (bench/notes/HISTORY.md, v13), so "shipped" already includes what this sweep found.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import pathlib
import sys
import time

import torch
import triton
import triton.language as tl

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.harness import parse_shapes, write_results  # noqa: E402
from bitkernels import ops  # noqa: E402
from bitkernels.ops._common import cast_to  # noqa: E402
from bitkernels.ops.int8_matmul import (  # noqa: E402
    _ensure_scratch_allocator, _scale_and_store, _scale_and_store_halves, _scaled, _tile_ids)


def load_baseline(path: str):
    """An earlier int8_matmul.py as a module of this package (its relative imports resolve to today's helpers)."""
    import importlib.util

    file = pathlib.Path(path)
    if not file.is_file():
        raise SystemExit(f"--baseline: no file {path} (write one with git show REV:bitkernels/ops/int8_matmul.py)")
    spec = importlib.util.spec_from_file_location("bitkernels.ops._int8_matmul_baseline", file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def baseline_differs(baseline, a, b, a_scale, b_scale, shipped) -> list[str]:
    """Where the baseline's int8_matmul differs from the shipped one (``shipped``: its result without bias; per-tensor
    scale, without and with a bias)."""
    bias = torch.randn(b.shape[0], device=a.device, dtype=torch.bfloat16)
    with_bias = ops.int8_matmul(a, b, a_scale, b_scale, bias, out_dtype=torch.bfloat16, tma=True)
    wrong = []
    for name, extra, want in (("no bias", (), shipped), ("bias", (bias,), with_bias)):
        if not torch.equal(baseline.int8_matmul(a, b, a_scale, b_scale, *extra, out_dtype=torch.bfloat16, tma=True),
                           want):
            wrong.append(name)
    return wrong


INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _int8_gemm_variant(a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, M, N, K, stride_am, stride_bn, stride_cm,
                       NUM_PROGRAMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr, WS: tl.constexpr, FLATTEN: tl.constexpr, TMA_STORE: tl.constexpr,
                       SUBTILE: tl.constexpr):
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_bn, 1], block_shape=[BLOCK_N, BLOCK_K])
    STORE_N: tl.constexpr = BLOCK_N // 2 if SUBTILE else BLOCK_N
    if TMA_STORE:
        c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[stride_cm, 1], block_shape=[BLOCK_M, STORE_N])
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    # The epilogue recomputes its tile from a second counter: a value used both before the K loop and after it
    # would tie the (flattened, specialized) loop's stages together.
    tile_id_c = tl.program_id(0) - NUM_PROGRAMS
    for tile_id in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS, flatten=FLATTEN, warp_specialize=WS):
        pid_m, pid_n = _tile_ids(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            a = a_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
            b = b_desc.load([pid_n * BLOCK_N, k * BLOCK_K])
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        tile_id_c += NUM_PROGRAMS
        pid_m, pid_n = _tile_ids(tile_id_c, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        offs_m = off_m + tl.arange(0, BLOCK_M)
        # The shipped epilogue's arithmetic (per-tensor weight scale, no bias: the bias pointer is unused).
        if TMA_STORE:
            if SUBTILE:  # the shipped two-half epilogue itself
                _scale_and_store_halves(acc, c_desc, c_ptr, a_scale_ptr, b_scale_ptr, b_scale_ptr, off_m, off_n, M, N,
                                        False, False)
            else:
                y = _scaled(acc, a_scale_ptr, b_scale_ptr, b_scale_ptr, offs_m, off_n + tl.arange(0, BLOCK_N), M, N,
                            False, False)
                c_desc.store([off_m, off_n], cast_to(y, c_ptr.dtype.element_ty))
        else:  # the shipped epilogue itself, store included
            _scale_and_store(acc, c_ptr, a_scale_ptr, b_scale_ptr, b_scale_ptr, offs_m, off_n + tl.arange(0, BLOCK_N),
                             M, N, stride_cm, 1, False, False)


def run_variant(a, b, a_scale, b_scale, variant: dict, num_sms: int, resources: dict | None = None) -> torch.Tensor:
    """One variant's GEMM; ``resources``, if given, receives its kernel's registers a thread and shared memory."""
    m, k = a.shape
    n = b.shape[0]
    c = torch.empty((m, n), device=a.device, dtype=torch.bfloat16)
    meta = {name: value for name, value in variant.items() if name != "PROGRAMS_PER_SM"}
    programs = min(num_sms * variant.get("PROGRAMS_PER_SM", 1),
                   triton.cdiv(m, variant["BLOCK_M"]) * triton.cdiv(n, variant["BLOCK_N"]))
    kernel = _int8_gemm_variant[(programs,)](a, b, c, a_scale, b_scale, m, n, k, a.stride(0), b.stride(0),
                                             c.stride(0), NUM_PROGRAMS=programs, GROUP_M=8 if not INTERPRET else 2,
                                             **meta)
    if resources is not None and not INTERPRET:
        resources.update(regs=kernel.n_regs, shared=kernel.metadata.shared)
    return c


def occupancy_variants() -> list[dict]:
    """Two programs resident on each SM (``--set occupancy``): tiles of one warpgroup (or two of 64 rows) small enough
    that two fit an SM's registers and shared memory, so that one program's epilogue overlaps the other's main loop
    (what a ping-pong schedule does with two consumer warpgroups; with one program an SM the MMAs idle while it
    stores). Before this sweep the shipped kernel ran one an SM and spent ~66 us at K=1024 on 51.5 GOP where its main
    loops alone would take ~42 (bench/notes/HISTORY.md "v16", which shipped the winner). One program an SM of the
    same tiles, and the 128x256 tile, as controls."""
    if INTERPRET:
        tiles = [(16, 32, 32, 4, 1, 2)]
    else:  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, programs per SM)
        tiles = [(128, 256, 128, 8, 4, 1), (128, 128, 128, 4, 3, 1), (128, 128, 128, 4, 3, 2), (128, 128, 128, 4, 2, 2),
                 (128, 128, 64, 4, 4, 2), (128, 128, 64, 4, 3, 2), (128, 128, 128, 8, 3, 2), (128, 128, 64, 8, 4, 2),
                 (64, 256, 64, 4, 4, 2), (128, 128, 64, 4, 3, 3)]
    epilogues = [(False, True, True, True), (False, True, False, False)]  # the shipped two-half store; pointer store
    return [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, WS=ws, FLATTEN=fl, TMA_STORE=ts, SUBTILE=st, num_warps=w,
                 num_stages=s, PROGRAMS_PER_SM=ppsm)
            for ws, fl, ts, st in epilogues for bm, bn, bk, w, s, ppsm in tiles]


def variants() -> list[dict]:
    if INTERPRET:  # small tiles; every epilogue / loop combination once (the interpreter ignores warp_specialize)
        tiles = [(16, 32, 32, 4, 1)]
    else:  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): the shipped winners, and a 4th stage
        tiles = [(128, 256, 128, 8, 3), (256, 128, 128, 8, 3), (128, 256, 128, 8, 4), (256, 128, 128, 8, 4),
                 (128, 128, 256, 8, 3)]
    # (WS, FLATTEN, TMA_STORE, SUBTILE), most promising first: the compile budget may cut the list short. Hopper's
    # warp specialization takes unflattened loops (flatten=True with it is Blackwell-only in Triton's own benchmarks),
    # so its variants come unflattened first; the flattened ones show whether this Triton rejects or ignores them.
    epilogues = [(False, True, False, False), (True, False, False, False), (True, False, True, False),
                 (True, False, True, True), (False, True, True, True), (True, True, False, False),
                 (False, True, True, False)]
    return [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, WS=ws, FLATTEN=fl, TMA_STORE=ts, SUBTILE=st, num_warps=w,
                 num_stages=s)
            for ws, fl, ts, st in epilogues for bm, bn, bk, w, s in tiles]


def label(v: dict) -> str:
    flags = [name for name in ("WS", "FLATTEN", "TMA_STORE", "SUBTILE") if v[name]]
    programs = f" p{v['PROGRAMS_PER_SM']}" if "PROGRAMS_PER_SM" in v else ""
    return (f"{v['BLOCK_M']}x{v['BLOCK_N']}x{v['BLOCK_K']} w{v['num_warps']} s{v['num_stages']}{programs} "
            f"{'+'.join(flags)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compile-budget", type=float, default=240.0, help="seconds of compiling before skipping the rest")
    p.add_argument("--out", default=None)
    p.add_argument("--baseline", default=None, help="an earlier bitkernels/ops/int8_matmul.py to check and time too")
    p.add_argument("--shapes", default="8192x2048x6144,8192x2560x9728,8192x9728x2560,2048x2048x6144",
                   help="GPU shapes, MxKxN (tokens x in x out), comma-separated")
    p.add_argument("--top", type=int, default=8, help="variants printed per shape, fastest first")
    p.add_argument("--set", choices=("epilogues", "occupancy"), default="epilogues",
                   help="which variants: warp specialization and epilogues (default), or two programs an SM")
    args = p.parse_args(argv)
    baseline = load_baseline(args.baseline) if args.baseline else None
    if INTERPRET:
        device, num_sms = torch.device("cpu"), 2
        shapes = [(48, 64, 80), (33, 96, 40)]  # MxKxN: partial tiles in M and N, several tiles per program
    elif torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9:
        device, num_sms = torch.device("cuda"), torch.cuda.get_device_properties(0).multi_processor_count
        shapes = parse_shapes(args.shapes)
        _ensure_scratch_allocator()
    else:
        raise SystemExit("needs an sm_90+ GPU (TMA), or TRITON_INTERPRET=1 for the CPU correctness pass")
    torch.manual_seed(0)
    data = {}
    for m, k, n in shapes:
        a = torch.randint(-127, 128, (m, k), device=device, dtype=torch.int8)
        b = torch.randint(-1, 2, (n, k), device=device, dtype=torch.int8)
        a_scale = torch.rand(m, device=device) * 0.01
        b_scale = torch.rand((), device=device)
        data[(m, k, n)] = (a, b, a_scale, b_scale, ops.int8_matmul(a, b, a_scale, b_scale, out_dtype=torch.bfloat16,
                                                                    tma=True))
    started, usable, failures, resources = time.time(), [], {}, {}
    for v in (occupancy_variants() if args.set == "occupancy" else variants()):  # compile, check on every shape first
        if time.time() - started > args.compile_budget:
            failures[label(v)] = "skipped: compile budget spent"
            continue
        try:
            used = {}
            wrong = [s for s, (a, b, sa, sb, want) in data.items()
                     if not torch.equal(run_variant(a, b, sa, sb, v, num_sms, used), want)]
            if used:
                resources[label(v)] = used
        except Exception as exc:  # a variant this Triton cannot compile
            failures[label(v)] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            continue
        if wrong:
            failures[label(v)] = f"differs from the shipped kernel at {wrong}"
        else:
            usable.append(v)
    if baseline is not None:
        baseline_wrong = {shape: wrong for shape, operands in data.items()
                          if (wrong := baseline_differs(baseline, *operands))}
        for shape, wrong in baseline_wrong.items():
            failures[f"baseline at {shape}"] = f"differs from the shipped kernel ({', '.join(wrong)})"
        if baseline_wrong:
            baseline = None  # an A/B of kernels that compute different things would mean nothing
    for name, why in failures.items():
        print(f"not timed: {name}: {why}")
    print(f"{len(usable)} variants equal the shipped kernel bit for bit on every shape", flush=True)
    if INTERPRET:
        return 1 if failures else 0
    from triton.testing import do_bench

    results = []
    for shape, (a, b, sa, sb, _) in data.items():
        m, k, n = shape
        xb = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        wb = torch.randn(n, k, device=device, dtype=torch.bfloat16)
        row = {"shape": f"M={m} K={k} N={n}",
               "shipped_us": do_bench(lambda: ops.int8_matmul(a, b, sa, sb, out_dtype=torch.bfloat16)) * 1e3,
               "cublas_bf16_us": do_bench(lambda: xb @ wb.t()) * 1e3, "variants_us": {}}
        if baseline is not None:
            row["baseline_us"] = do_bench(lambda: baseline.int8_matmul(a, b, sa, sb, out_dtype=torch.bfloat16)) * 1e3
        for v in usable:
            row["variants_us"][label(v)] = do_bench(lambda v=v: run_variant(a, b, sa, sb, v, num_sms)) * 1e3
        results.append(row)
        ops_ = 2 * m * n * k
        print(f"\n{row['shape']}: shipped {row['shipped_us']:.1f} us ({ops_ / row['shipped_us'] / 1e6:.0f} TOP/s), "
              f"cuBLAS bf16 {row['cublas_bf16_us']:.1f} us"
              + (f", baseline {row['baseline_us']:.1f} us" if baseline is not None else ""))
        for name, t in sorted(row["variants_us"].items(), key=lambda kv: kv[1])[:args.top]:
            used = resources.get(name)
            print(f"  {t:8.1f} us {ops_ / t / 1e6:6.0f} TOP/s  {name}"
                  + (f"  ({used['regs']} regs, {used['shared']} B shared)" if used else ""))
    meta = {"device": torch.cuda.get_device_name(), "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
            "torch": torch.__version__, "triton": triton.__version__}
    out = write_results({"meta": meta, "set": args.set, "not_timed": failures, "resources": resources,
                         "rows": results}, args.out, meta,
                        "-int8-gemm-variants" + ("-occupancy" if args.set == "occupancy" else ""))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Timing and memory harness shared by every benchmark suite (see bench/compare.py).

A suite is a module in bench/suites/ with ``cases(device, quick) -> iterable of Case``. Each Case names zero-argument
callables, one per implementation, run side by side in one process; bytes/flops give the floor and achieved rates.
Every result file records the code it measured (``git_provenance``: the commit and whether the tree was dirty).
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Case:
    suite: str
    name: str                                   # e.g. "ternarize_absmean fwd"
    shape: str                                  # human-readable problem size, e.g. "M=8192 K=2048"
    impls: dict[str, Callable[[], object]]      # implementation name -> zero-arg callable
    bytes_moved: float | None = None            # fewest bytes the op must move (each input read once, output once)
    flops: float | None = None                  # arithmetic of the op, for matrix-bound cases
    notes: dict = field(default_factory=dict)


RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
ROOT = RESULTS_DIR.parents[1]
UNKNOWN = "unknown"


def _git(*args: str) -> str | None:
    """``git args`` in the checkout: its stdout, or None where git is missing or fails (no repository, no history)."""
    try:
        done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def git_provenance() -> dict:
    """What code a result measured: ``{"git_commit": HEAD's sha, "git_dirty": whether ``git status --porcelain``
    lists anything}``. ``BITKERNELS_GIT_COMMIT``, where set, names the commit instead (the device machines' copy of the
    checkout may have no git history: set it to the commit the copy was made from). "unknown" for whatever git
    cannot tell."""
    head = _git("rev-parse", "HEAD")
    commit = os.environ.get("BITKERNELS_GIT_COMMIT", "").strip() or (head.strip() if head else "") or UNKNOWN
    status = _git("status", "--porcelain") if head else None
    return {"git_commit": commit, "git_dirty": UNKNOWN if status is None else bool(status.strip())}


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """A ``--shapes`` argument, "8192x2048x6144,2048x1024x3072" (tokens x in x out), as (M, K, N) tuples."""
    shapes = []
    for item in text.split(","):
        parts = item.lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise SystemExit(f"--shapes: {item!r} is not TOKENSxINxOUT (positive integers, e.g. 8192x2048x6144)")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def write_json(path: pathlib.Path, payload: dict) -> pathlib.Path:
    """``payload`` as JSON at ``path``, through a temporary file: an interrupted run leaves no half-written result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)
    return path


def write_results(payload: dict, out: str | None, meta: dict, suffix: str = "") -> pathlib.Path:
    """Write ``payload`` as JSON to ``out``, or by default to bench/results/<device>-<date><suffix>.json, with the
    code's provenance (``git_provenance``) added to its ``meta``."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", meta["device"]).strip("-").lower()
    path = pathlib.Path(out) if out else RESULTS_DIR / f"{slug}-{meta['date']}{suffix}.json"
    return write_json(path, {**payload, "meta": {**payload.get("meta", {}), **git_provenance()}})


def time_ms(fn: Callable[[], object], device: torch.device, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median milliseconds of ``fn``: CUDA events through triton.testing.do_bench on GPU, a host clock on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    samples = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def warm_up(impls: dict[str, Callable[[], object]], device: torch.device, spin_ms: float = 200.0) -> None:
    """Run every implementation once (compiles, autotunes) and then keep the GPU busy for ``spin_ms``, so the
    first timed implementation does not pay for clocks that dropped while the CPU was compiling."""
    for fn in impls.values():
        try:
            fn()
        except Exception:  # reported when it is timed
            pass
    if device.type == "cuda":
        a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
        t0 = time.perf_counter()
        while (time.perf_counter() - t0) * 1e3 < spin_ms:
            for _ in range(10):
                a @ a
            torch.cuda.synchronize()


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak device memory allocated while ``fn`` runs, above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak


def measure_copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float | None:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def measure_matmul_tflops(device: torch.device, n: int = 8192) -> float | None:
    """bf16 matrix rate (TFLOP/s) of one large cuBLAS product on random data."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, device)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12

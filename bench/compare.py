"""Side-by-side kernel timings: ours vs the PyTorch reference (eager and torch.compile), one process, one table.

    python bench/compare.py                 # every suite; on a GPU at real shapes
    python bench/compare.py --suite quant   # one suite (names: files in bench/suites/)

Writes bench/results/<device>-<date>.json, and beside it a .png of each peer's time over ours where peers ran
(bench/peers.py: FLA, onebitllms, torchao, Liger, when installed). On a CPU the kernels run in Triton's interpreter
at tiny shapes: the timings there only show that the harness works and mean nothing about speed.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import pathlib
import platform
import sys
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

if not torch.cuda.is_available():  # the kernels can only run on a CPU through Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench.peers import plot_peer_ratios  # noqa: E402
from bench.harness import (  # noqa: E402
    measure_copy_bandwidth, measure_matmul_tflops, peak_memory_bytes, time_ms, warm_up, write_results)

SUITES_DIR = ROOT / "bench" / "suites"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"


def run_suite(name: str, device: torch.device, quick: bool, measure_memory: bool,
              copy_gbps: float | None = None) -> list[dict]:
    module = importlib.import_module(f"bench.suites.{name}")
    rows = []
    for case in module.cases(device, quick):
        row = {"suite": case.suite, "case": case.name, "shape": case.shape, "ms": {}, "peak_bytes": {},
               "bytes_moved": case.bytes_moved, "flops": case.flops, **case.notes}
        warm_up(case.impls, device)
        for impl, fn in case.impls.items():
            try:
                row["ms"][impl] = time_ms(fn, device)
                if measure_memory:
                    row["peak_bytes"][impl] = peak_memory_bytes(fn, device)
            except Exception as exc:  # one failing implementation (e.g. compile OOM) must not hide the others
                row["ms"][impl] = None
                row.setdefault("errors", {})[impl] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                traceback.print_exc()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        print(format_row(row, copy_gbps), flush=True)
    return rows


def format_row(row: dict, copy_gbps: float | None = None) -> str:
    ms = row["ms"]
    ours = ms.get("ours")
    parts = [f"{row['suite']:<10} {row['case']:<34} {row['shape']:<24}"]
    for impl, t in ms.items():
        parts.append(f"{impl}={t:.3f}ms" if t is not None else f"{impl}=FAIL")
    if ours:
        for impl, t in ms.items():
            if impl != "ours" and t:
                parts.append(f"x{t / ours:.2f} vs {impl}")
        if row.get("bytes_moved"):
            gbps = row["bytes_moved"] / (ours * 1e-3) / 1e9
            parts.append(f"{gbps:.0f} GB/s" + (f" ({gbps / copy_gbps:.0%} of copy)" if copy_gbps else ""))
        if row.get("flops"):
            parts.append(f"{row['flops'] / (ours * 1e-3) / 1e12:.0f} TFLOP/s")
    return "  ".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="all", help="comma-separated suite names, or 'all'")
    p.add_argument("--quick", action="store_true", help="fewest shapes (forced on the CPU)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/<device>-<date>.json)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or device.type == "cpu"
    available = sorted(f.stem for f in SUITES_DIR.glob("*.py") if not f.stem.startswith("_"))
    names = available if args.suite == "all" else args.suite.split(",")
    unknown = [n for n in names if n not in available]
    if unknown:
        p.error(f"unknown suite(s) {unknown}; available: {available}")
    if device.type == "cpu":
        print("NOTE: no CUDA device: kernels run in Triton's interpreter at tiny shapes; "
              "these timings mean nothing about speed.", flush=True)

    meta = {
        "device": device_name(device),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "triton": importlib.import_module("triton").__version__,
        "cuda": torch.version.cuda,
        "interpreter": device.type == "cpu",
        "copy_bandwidth_GBps": measure_copy_bandwidth(device),
        "bf16_matmul_TFLOPs": measure_matmul_tflops(device),
    }
    print(json.dumps(meta), flush=True)
    rows = []
    for name in names:
        rows += run_suite(name, device, quick, not args.no_memory, meta["copy_bandwidth_GBps"])

    out = write_results({"meta": meta, "rows": rows}, args.out, meta)
    print(f"\nwrote {out}")
    if plot_peer_ratios(rows, out.with_suffix(".png")):
        print(f"wrote {out.with_suffix('.png')}")
    print("\n".join(format_row(r, meta["copy_bandwidth_GBps"]) for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the K-blocked weight gradient costs: BitLinear's fwd+bwd step with ``GRAD_WEIGHT_BLOCK_BYTES`` at its
default (full-width blocks and a tail, and with ``GRAD_WEIGHT_EQUAL_BLOCKS``: equal ones) and raised so the step
runs unblocked, beside plain RMSNorm + nn.Linear (eager and compiled), same tensors.

    python bench/tools/ab_grad_weight_block.py [--shapes 8192x2048x6144,8192x2560x9728] [--repeats 5] [--out p.json]
        [--kernels]

Passes alternate over the settings (single passes drift on a shared host); the table shows each setting's median
over passes of do_bench medians, and the step's peak memory above what was held before it (bench/harness.py's
measure, as compare.py's). Gradients of the two settings are compared first. CUDA only. Writes JSON with device,
date and commit (default bench/results/<device>-<date>-grad-weight-block-ab.json). ``--kernels`` adds, per setting,
the step's GPU kernels from the profiler (time per step of each kernel name, no L2 flush; median over ``--repeats``
profiles taken in rotating order): where the blocked setting's extra time goes.
"""
from __future__ import annotations

import argparse
import datetime as dt
import pathlib
import statistics
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from bench.harness import parse_shapes, peak_memory_bytes, time_ms, warm_up, write_results  # noqa: E402
from bench.suites.bitlinear import EPS, _fwd_bwd, plain, training_inputs  # noqa: E402

DEFAULT_SHAPES = "8192x2048x6144,8192x2560x9728,8192x9728x2560"
UNBLOCKED = 1 << 62


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="TOKENSxINxOUT list")
    p.add_argument("--repeats", type=int, default=5, help="alternating passes over the settings")
    p.add_argument("--out", default=None)
    p.add_argument("--kernels", action="store_true", help="also each setting's GPU kernels per step (profiler)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device: the blocking trades GPU memory for GPU time")
    from bitkernels import ops
    from bitkernels.ops import bitlinear_impl

    device = torch.device("cuda")
    default_bytes = bitlinear_impl.GRAD_WEIGHT_BLOCK_BYTES
    default_equal = bitlinear_impl.GRAD_WEIGHT_EQUAL_BLOCKS
    block_name = f"ours_block_{default_bytes >> 20}MiB"
    settings = {block_name: (default_bytes, False), f"{block_name}_equal": (default_bytes, True),
                "ours_unblocked": (UNBLOCKED, False)}
    plain_c = torch.compile(plain, dynamic=False)
    rows = []
    for tokens, k, n in parse_shapes(args.shapes):
        x, w, nw, dy = training_inputs(tokens, k, n, device)
        block_columns = bitlinear_impl.grad_weight_block_columns(tokens, k, x.dtype)
        ours = _fwd_bwd(lambda x=x, w=w, nw=nw: ops.bitlinear(x, w, None, nw, EPS), (x, w, nw), dy)
        steps = {"plain_eager": _fwd_bwd(lambda x=x, w=w, nw=nw: plain(x, nw, w), (x, w, nw), dy),
                 "plain_compile": _fwd_bwd(lambda x=x, w=w, nw=nw: plain_c(x, nw, w), (x, w, nw), dy)}

        def with_block(setting, fn=ours):
            def run():
                bitlinear_impl.GRAD_WEIGHT_BLOCK_BYTES, bitlinear_impl.GRAD_WEIGHT_EQUAL_BLOCKS = setting
                try:
                    return fn()
                finally:
                    bitlinear_impl.GRAD_WEIGHT_BLOCK_BYTES = default_bytes
                    bitlinear_impl.GRAD_WEIGHT_EQUAL_BLOCKS = default_equal
            return run
        steps.update({name: with_block(setting) for name, setting in settings.items()})

        grads = {}
        for name in settings:
            steps[name]()
            grads[name] = [t.grad.float().clone() for t in (x, w, nw)]
        *blocked, whole = grads.values()  # each blocked setting against the unblocked one
        rel = [float((u - v).norm() / v.norm().clamp_min(1e-30)) for a in blocked for u, v in zip(a, whole)]
        del grads, blocked, whole

        warm_up(steps, device)
        samples = {name: [] for name in steps}
        for _ in range(args.repeats):
            for name, fn in steps.items():
                samples[name].append(time_ms(fn, device))
        peaks = {name: peak_memory_bytes(fn, device) for name, fn in steps.items()}
        row = {"shape": [tokens, k, n], "block_columns": block_columns, "grad_rel_l2_x_w_nw_per_blocked_setting": rel,
               "ms": {name: statistics.median(v) for name, v in samples.items()}, "ms_passes": samples,
               "peak_MiB": {name: v / 2**20 for name, v in peaks.items()}}
        if args.kernels:
            row["kernels_us_per_step"], row["kernels_total_us_passes"] = kernel_passes(
                {name: steps[name] for name in settings}, args.repeats)
        rows.append(row)
        plain_ms = row["ms"]["plain_compile"]
        print(f"{tokens}x{k}x{n} (blocks of {block_columns} columns; grads rel L2 x/w/nw, each blocked setting "
              "against unblocked " + "/".join(f"{r:.1e}" for r in rel) + ")")
        for name in steps:
            print(f"  {name:<22} {row['ms'][name]:8.3f} ms  {row['ms'][name] / plain_ms:5.2f}x plain compiled"
                  f"  peak {row['peak_MiB'][name]:7.1f} MiB")
        for name, table in row.get("kernels_us_per_step", {}).items():
            print(f"  {name} kernels, us per step (total {sum(table.values()):.1f}):")
            for kernel, us in sorted(table.items(), key=lambda kv: -kv[1]):
                print(f"    {us:8.1f}  {kernel[:100]}")
        del x, w, nw, dy, ours, steps
        torch.cuda.empty_cache()

    name = torch.cuda.get_device_name()
    meta = {"device": name, "date": dt.date.today().isoformat(), "torch": torch.__version__,
            "repeats": args.repeats, "default_block_bytes": default_bytes}
    path = write_results({"rows": rows, "meta": meta}, args.out, meta, "-grad-weight-block-ab")
    print(f"wrote {path}")
    return 0


def kernel_passes(steps: dict, repeats: int) -> tuple[dict, dict]:
    """Each setting's kernels profiled ``repeats`` times, the order of the settings rotated each pass (the first one
    profiled ran slower even in kernels that do the same work in every setting): per kernel name the median over
    passes, and each pass's total."""
    names = list(steps)
    passes: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for r in range(max(repeats, 1)):
        for name in names[r % len(names):] + names[:r % len(names)]:
            passes[name].append(kernel_times(steps[name]))
    medians = {name: {kernel: statistics.median(p.get(kernel, 0.0) for p in runs)
                      for kernel in set().union(*runs)} for name, runs in passes.items()}
    return medians, {name: [sum(p.values()) for p in runs] for name, runs in passes.items()}


def kernel_times(step, steps: int = 5) -> dict[str, float]:
    """Microseconds per step of each GPU kernel name over ``steps`` profiled steps."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.device_time_total > 0:
            totals[event.name] = totals.get(event.name, 0.0) + event.device_time_total / steps
    return totals


if __name__ == "__main__":
    raise SystemExit(main())

"""Is a BitLinear row host-bound? Per fwd+bwd step: the bench's time, host time, and GPU kernel time, side by side.

    python bench/tools/profile_bitlinear_host.py [--shapes 8192x2048x6144,8192x1024x3072] [--out path.json]
    python bench/tools/profile_bitlinear_host.py --pieces [--shapes 8192x2048x6144]  # host time of each piece of ours
    python bench/tools/profile_bitlinear_host.py --ab REV [--repeats 7]    # host time of `ours` vs git REV's
    python bench/tools/profile_bitlinear_host.py --ab DIR                  # ... vs DIR/bitkernels (no git)

For each shape (tokens x in x out) and implementation of the bitlinear suite (ours eager, ours under torch.compile
default and reduce-overhead modes, plain RMSNorm + nn.Linear eager / compiled / CUDA graphs), three numbers per
step, in microseconds:
    bench    do_bench's median, as bench/compare.py reports it (L2 flushed between steps)
    host     wall time of issuing the step while the GPU is still busy with a long sleep kernel: the Python, framework
             and launch cost alone; a step whose host time is above its GPU time is host-bound
    gpu      the sum of the step's kernel durations from the profiler (no flush): what the step costs the GPU
The ratio of two implementations' `gpu` columns is what the comparison would read on a host fast enough to keep the
GPU fed. ``--pieces`` instead splits the host time of `ours`' step: forward, backward through autograd and the same
backward work called directly (on this thread and on another, as autograd's device thread runs it), what the engine
costs for a do-nothing Python node, and each op of the step alone, next to plain eager's forward and backward.
``--ab REV`` is the A/B of a host-side change: the ``bitkernels`` package of git revision REV, imported under another
name beside the working tree's in the same process, its fwd+bwd step and forward against ours (outputs and gradients
compared bit for bit first), host time and bench time per pass, passes alternating (single passes vary up to 5x on
the H100 host). CUDA only. Writes JSON with the device and date (default
bench/results/<device>-<date>-host-profile.json, or ...-host-pieces.json, ...-host-ab.json).
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib
import io
import json
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Callable, NamedTuple

import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.harness import parse_shapes, write_results  # noqa: E402
from bench.suites.bitlinear import EPS, plain, reference_bitlinear, training_inputs, training_steps  # noqa: E402
from bitkernels.reference.quantization import ACT_EPS  # noqa: E402


def host_us(step, calls: int = 20, sleep_cycles: int = int(2e9)) -> float:
    """Host time per step with the GPU kept busy ahead of it, so no launch waits for the GPU to drain."""
    step()
    torch.cuda.synchronize()
    torch.cuda._sleep(sleep_cycles)  # default ~1 s of GPU clock cycles: longer than the calls take to issue
    t0 = time.perf_counter()
    for _ in range(calls):
        step()
    elapsed = time.perf_counter() - t0
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def gpu_us(step, calls: int = 10) -> tuple[float, float, dict[str, float]]:
    """(kernel time per step, kernels per step, kernel name -> time per step) from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, float] = {}
    for e in kernels:
        by_name[e.name[:80]] = by_name.get(e.name[:80], 0.0) + e.device_time / calls
    return sum(by_name.values()), len(kernels) / calls, by_name


PROFILED = ("ours", "ours_compile", "ours_cudagraph", "plain_eager", "plain_compile", "plain_cudagraph")


def steps_for(tokens: int, k: int, n: int, device: torch.device = torch.device("cuda")) -> dict:
    """The fwd+bwd step of each profiled implementation, built by the bitlinear suite's own builder."""
    compiled = (torch.compile(plain, dynamic=False), torch.compile(reference_bitlinear, dynamic=False))  # lazy
    steps = training_steps(*training_inputs(tokens, k, n, device), *compiled)[0]
    return {name: steps[name] for name in PROFILED if name in steps}


class _PassThrough(torch.autograd.Function):
    """A Python autograd node that does nothing in its backward: the engine's own cost per backward call."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad


def _on_another_thread(fn):
    """``fn`` run on a fresh thread (autograd runs CUDA backward nodes on its device thread, not the caller's)."""
    import threading

    def run():
        thread = threading.Thread(target=fn)
        thread.start()
        thread.join()
    return run


class OnAnotherThread(NamedTuple):
    """A piece whose calls ``piece_steps`` wants made on another thread."""
    fn: Callable


def _threaded_host_us(fn, calls: int = 20) -> float:
    """host_us of ``calls`` calls of ``fn`` made on one other thread (the thread's start and join included once)."""
    def batch():
        for _ in range(calls):
            fn()
    return host_us(_on_another_thread(batch), calls=1, sleep_cycles=int(4e8)) / calls


def piece_steps(tokens: int, k: int, n: int, device: torch.device = torch.device("cuda")) -> dict:
    """What `ours`' step is made of, each callable alone (inputs prepared once), with plain eager's halves."""
    from bitkernels import ops

    impl = importlib.import_module("bitkernels.ops.bitlinear")
    x, w, nw, dy = training_inputs(tokens, k, n, device)
    xd, wd, nwd = x.detach(), w.detach(), nw.detach()
    wc, ws = ops.ternarize_absmean(wd)
    xc, xs, rstd = ops.rmsnorm_quantize_int8_forward(xd, nwd, EPS, ACT_EPS)
    gh = ops.bitlinear_grad_input(dy, wc, ws)
    xq = ops.dequantize_int8(xc, xs, dy.dtype)
    y_ours, y_plain, y_pass = ops.bitlinear(x, w, None, nw, EPS), plain(x, nw, w), _PassThrough.apply(x)
    params = (x, w, nw)

    def backward_work():
        return impl.bitlinear_backward_impl(dy, xd, None, None, rstd, wc, ws, nwd, EPS, ACT_EPS, xd.dtype, wd.dtype,
                                            wd.dtype, True, True, False)

    return {
        "ours forward": lambda: ops.bitlinear(x, w, None, nw, EPS),
        "plain_eager forward": lambda: plain(x, nw, w),
        "ours backward (autograd)": lambda: torch.autograd.grad(y_ours, params, dy, retain_graph=True),
        "plain_eager backward (autograd)": lambda: torch.autograd.grad(y_plain, params, dy, retain_graph=True),
        "ours backward work, direct": backward_work,
        "ours backward work, direct, other thread": OnAnotherThread(backward_work),
        "engine: do-nothing Python node": lambda: torch.autograd.grad(y_pass, x, xd, retain_graph=True),
        "ternarize_absmean": lambda: ops.ternarize_absmean(wd),
        "rmsnorm_quantize_int8_forward": lambda: ops.rmsnorm_quantize_int8_forward(xd, nwd, EPS, ACT_EPS),
        "int8_matmul": lambda: ops.int8_matmul(xc, wc, xs, ws, out_dtype=dy.dtype),
        "dequantize_int8 (weight)": lambda: ops.dequantize_int8(wc, ws, dy.dtype),
        "bitlinear_grad_input (dequantize + mm)": lambda: ops.bitlinear_grad_input(dy, wc, ws),
        "rmsnorm_backward_and_dequantize": lambda: ops.rmsnorm_backward_and_dequantize(gh, xd, nwd, rstd, ACT_EPS,
                                                                                       dy.dtype),
        "bitlinear_grad_weight (mm)": lambda: ops.bitlinear_grad_weight(dy, xq, wd.dtype),
        "torch.empty": lambda: torch.empty(16, device=device),
    }


def profile_pieces(shapes, repeats: int) -> list[dict]:
    rows = []
    for tokens, k, n in shapes:
        torch.manual_seed(0)
        pieces = piece_steps(tokens, k, n)
        samples = {name: [] for name in pieces}
        for _ in range(repeats):
            for name, fn in pieces.items():
                if isinstance(fn, OnAnotherThread):
                    samples[name].append(_threaded_host_us(fn.fn))
                else:
                    samples[name].append(host_us(fn, sleep_cycles=int(4e8)))
        shape = f"M={tokens} K={k} N={n}"
        print(f"\n{shape}: host us per call, GPU kept busy (each pass)")
        for name, values in samples.items():
            rows.append({"shape": shape, "piece": name, "host_us": values})
            print(f"  {name:42s} " + " / ".join(f"{v:7.1f}" for v in values), flush=True)
    return rows


def package_at(rev: str, parent: pathlib.Path):
    """``bitkernels`` as of git revision ``rev``, importable beside the working tree's: extracted under ``parent`` as
    ``bitkernels_<sha>`` (relative imports inside the package keep it self-contained), its custom ops registered in
    their own ``bitkernels_<sha>::`` namespace (two packages defining ``bitkernels::*`` could not both import).
    ``rev`` may instead be a directory holding an extracted ``bitkernels/``, for machines whose copy of the checkout
    has no git history (made where it has: ``mkdir -p D && git archive REV bitkernels | tar -x -C D``)."""
    given = pathlib.Path(rev)
    if (given / "bitkernels" / "__init__.py").is_file():
        name = "bitkernels_" + re.sub(r"\W", "_", given.resolve().name)
        shutil.copytree(given / "bitkernels", parent / name, ignore=shutil.ignore_patterns("__pycache__"))
        return _import_renamed(parent, name)
    try:
        sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--short=10", f"{rev}^{{commit}}"],
                             check=True, capture_output=True, text=True).stdout.strip()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", sha, "bitkernels"], check=True,
                                 capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", b"") or str(e)
        detail = detail.decode() if isinstance(detail, bytes) else detail
        raise SystemExit(f"--ab: cannot read bitkernels at git revision {rev!r} ({detail.strip()}); pass a commit of "
                         "this repository, or a directory holding an extracted bitkernels/") from e
    name = f"bitkernels_{sha}"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        # only plain files under parent (Pythons with extraction filters; the archive is this repository's own)
        tar.extractall(parent, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (parent / "bitkernels").rename(parent / name)
    return _import_renamed(parent, name)


def _import_renamed(parent: pathlib.Path, name: str):
    """Import ``parent/name`` (a copy of bitkernels) with its custom ops renamed into the ``name::`` namespace."""
    for path in (parent / name).rglob("*.py"):
        text = path.read_text()
        renamed = re.sub(r"\bbitkernels::", f"{name}::", text).replace("torch.ops.bitkernels.", f"torch.ops.{name}.")
        if renamed != text:
            path.write_text(renamed)
    sys.path.insert(0, str(parent))
    try:
        return importlib.import_module(f"{name}.ops")
    finally:
        sys.path.remove(str(parent))


def ab_steps(tokens: int, k: int, n: int, old_ops, device: torch.device = torch.device("cuda")):
    """-> ({name: callable}, whether old and new give the same y, dx, dW and dnorm bit for bit): the fwd+bwd step and
    the forward of `ours` from ``old_ops`` (``package_at``) and from the working tree, and plain eager's."""
    from bitkernels import ops as new_ops

    x, w, nw, dy = training_inputs(tokens, k, n, device)
    params = (x, w, nw)
    forwards = {"old": lambda: old_ops.bitlinear(x, w, None, nw, EPS),
                "new": lambda: new_ops.bitlinear(x, w, None, nw, EPS),
                "plain": lambda: plain(x, nw, w)}

    def step_of(forward):
        def step():
            for p in params:
                p.grad = None
            y = forward()
            y.backward(dy)
            return y
        return step

    calls = {f"{name} step": step_of(f) for name, f in forwards.items()}
    calls.update({f"{name} fwd": f for name, f in forwards.items()})
    results = {name: [calls[f"{name} step"]().detach(), *(p.grad.clone() for p in params)] for name in ("old", "new")}
    same = all(torch.equal(a, b) for a, b in zip(results["old"], results["new"]))
    return calls, same


def profile_ab(shapes, repeats: int, old_ops) -> list[dict]:
    from triton.testing import do_bench

    rows = []
    for tokens, k, n in shapes:
        torch.manual_seed(0)
        calls, same = ab_steps(tokens, k, n, old_ops)
        shape = f"M={tokens} K={k} N={n}"
        print(f"\n{shape}: old and new bit for bit equal (y, dx, dW, dnorm): {same}", flush=True)
        for fn in calls.values():
            for _ in range(3):
                fn()
        torch.cuda.synchronize()
        samples = {name: {"host": [], "bench": []} for name in calls}
        for _ in range(repeats):
            for name, fn in calls.items():
                samples[name]["host"].append(host_us(fn, sleep_cycles=int(4e8)))
                samples[name]["bench"].append(do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3)
        print(f"  {'us':12s} {'host min':>9s} {'host med':>9s} {'bench med':>9s} {'gpu':>7s}")
        for name, fn in calls.items():
            host, bench = samples[name]["host"], samples[name]["bench"]
            gpu = gpu_us(fn)[0]
            rows.append({"shape": shape, "impl": name, "bits_equal_old_new": same, "host_us": host, "bench_us": bench,
                         "gpu_us": gpu})
            print(f"  {name:12s} {min(host):9.0f} {statistics.median(host):9.0f} {statistics.median(bench):9.0f} "
                  f"{gpu:7.0f}", flush=True)
        for part in ("step", "fwd"):
            old, new = samples[f"old {part}"]["host"], samples[f"new {part}"]["host"]
            print(f"  new / old host time, {part}: min {min(new) / min(old):.3f}, median "
                  f"{statistics.median(new) / statistics.median(old):.3f}")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=None, help="TOKENSxINxOUT list (default: 8192x2048x6144,8192x1024x3072,"
                   "2048x2048x6144; with --pieces 8192x2048x6144)")
    p.add_argument("--repeats", type=int, default=2, help="alternating passes over the implementations (or pieces: "
                   "at least 3; --ab: at least 5)")
    p.add_argument("--pieces", action="store_true", help="host time of each piece of ours' step instead")
    p.add_argument("--ab", metavar="REV", default=None, help="host time of ours' step and forward against the "
                   "bitkernels package of git revision REV, or of a directory holding an extracted bitkernels/ "
                   "(default shapes 2048x2048x6144,8192x2048x6144)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_bitlinear_host.py needs a CUDA device (host vs GPU time means nothing on the CPU)")
    from triton.testing import do_bench

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    device_name = torch.cuda.get_device_name()
    meta = {"device": device_name, "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
            "torch": torch.__version__, "triton": __import__("triton").__version__}
    print(json.dumps(meta), flush=True)
    if args.ab:
        head = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                              text=True).stdout.strip()
        with tempfile.TemporaryDirectory() as parent:
            old_ops = package_at(args.ab, pathlib.Path(parent))
            meta.update(old=old_ops.__name__.split(".")[0], new=head or "working tree")
            rows = profile_ab(parse_shapes(args.shapes or "2048x2048x6144,8192x2048x6144"), max(args.repeats, 5),
                              old_ops)
        out = write_results({"meta": meta, "rows": rows}, args.out, meta, "-host-ab")
        print(f"\nwrote {out}")
        return 0
    if args.pieces:
        rows = profile_pieces(parse_shapes(args.shapes or "8192x2048x6144"), max(args.repeats, 3))
        out = write_results({"meta": meta, "rows": rows}, args.out, meta, "-host-pieces")
        print(f"\nwrote {out}")
        return 0
    rows = []
    for tokens, k, n in parse_shapes(args.shapes or "8192x2048x6144,8192x1024x3072,2048x2048x6144"):
        torch.manual_seed(0)
        steps = steps_for(tokens, k, n)
        for step in steps.values():  # compile, autotune, record the CUDA graphs
            for _ in range(3):
                step()
        torch.cuda.synchronize()
        samples = {name: {"bench": [], "host": []} for name in steps}
        for _ in range(args.repeats):  # alternate, so a slow spell of the host hits every implementation
            for name, step in steps.items():
                samples[name]["bench"].append(do_bench(step, warmup=25, rep=100, return_mode="median") * 1e3)
                samples[name]["host"].append(host_us(step))
        shape = f"M={tokens} K={k} N={n}"
        print(f"\n{shape} (us per fwd+bwd step; bench and host: each pass, gpu: kernel sum)")
        for name, step in steps.items():
            gpu, kernels, by_name = gpu_us(step)
            row = {"shape": shape, "impl": name, "bench_us": samples[name]["bench"], "host_us": samples[name]["host"],
                   "gpu_us": gpu, "kernels_per_step": kernels, "kernels_us": by_name}
            rows.append(row)
            print(f"  {name:16s} bench {' / '.join(f'{v:7.1f}' for v in row['bench_us'])}   host "
                  f"{' / '.join(f'{v:7.1f}' for v in row['host_us'])}   gpu {gpu:7.1f} ({kernels:.0f} kernels)"
                  f"   host/gpu {statistics.median(row['host_us']) / gpu:.2f}", flush=True)
    out = write_results({"meta": meta, "rows": rows}, args.out, meta, "-host-profile")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

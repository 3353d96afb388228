"""Triton launches with less host time.

``kernel[grid](...)`` (``JITFunction.run``) binds the arguments, derives their specialization and looks the compiled
kernel up on every call: 16-20 us of host time per launch on the H100 host, against ~6 us for the compiled kernel's
own launcher (measured 2026-11-23). A BitLinear training step makes seven or eight such launches, and small layers are
host-bound. ``launch`` takes Triton's path on the first call for each argument specialization, keeps the compiled
kernel, and afterwards calls its launcher directly.

The cache key is a superset of what Triton specializes on: each tensor's dtype and 16-byte alignment, each integer's
divisibility by 16, its being 1 and its width, floats as floats, each host TMA descriptor's type, base dtype, block
shape, padding and the divisibility of its shape and strides, and every keyword (constexprs and compile options) by
value. A hit is therefore the kernel Triton itself would have picked. Anything else (keyword runtime arguments,
launch hooks of a profiler, the interpreter) takes Triton's own path.
"""
from __future__ import annotations

import os

import torch

try:  # the pieces of Triton's runtime used below; without them (other versions) every launch takes Triton's path
    from triton import knobs
    from triton.compiler import CompiledKernel
    from triton.runtime import driver
except ImportError:  # pragma: no cover - depends on the Triton version
    knobs = CompiledKernel = driver = None
try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the Triton version
    TensorDescriptor = None

# BITKERNELS_FAST_LAUNCH=0 sends every launch through Triton's JITFunction.run (to rule this module out).
ENABLED = (CompiledKernel is not None and os.environ.get("BITKERNELS_FAST_LAUNCH", "1") != "0"
           and os.environ.get("TRITON_INTERPRET", "0") != "1")

_compiled: dict[tuple, tuple] = {}  # key -> (compiled kernel, constexpr values in signature order)
_unsupported: set = set()  # kernels whose signature or call does not fit the fast path


class _NotCacheable(Exception):
    pass


def _specialization(arg):
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if isinstance(arg, bool):  # before int: bool is an int
        return bool
    if isinstance(arg, int):
        return arg == 1, arg % 16 == 0, -2**31 <= arg < 2**31, -2**63 <= arg < 2**63
    if isinstance(arg, float):
        return float
    if arg is None:
        return None
    if TensorDescriptor is not None and isinstance(arg, TensorDescriptor):
        # Triton keys a host descriptor on its base's dtype and block shape (the TMA GEMM's config sets the block
        # shape before each launch); shape and strides travel as runtime values, kept here by divisibility anyway.
        return (type(arg), arg.base.dtype, tuple(arg.block_shape), getattr(arg, "padding", None),
                getattr(arg, "round_f32_to_tf32", None), tuple(v % 16 == 0 for v in arg.shape),
                tuple(v % 16 == 0 for v in arg.strides))
    raise _NotCacheable


def _hooks_idle() -> bool:
    """No launch hooks (a profiler's) registered: the direct call may skip them as Triton does."""
    enter, exit_ = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    return ((enter is None or not getattr(enter, "calls", True))
            and (exit_ is None or not getattr(exit_, "calls", True)))


def _constexpr_tail(kernel, n_args: int, kwargs: dict):
    """The constexpr values in signature order, if the call passes exactly the runtime parameters positionally and
    the constexprs (all after them) by keyword; else None."""
    params = getattr(kernel, "params", None)
    if params is None or len(params) < n_args or any(p.is_constexpr for p in params[:n_args]):
        return None
    tail = params[n_args:]
    if not all(p.is_constexpr and p.name in kwargs for p in tail):
        return None
    return tuple(kwargs[p.name] for p in tail)


def launch(kernel, grid: tuple, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``, through the kernel's compiled launcher once Triton has compiled it for this
    specialization. Pass the runtime arguments positionally and the constexprs and options by keyword."""
    if (not ENABLED or callable(grid) or kernel in _unsupported or getattr(kernel, "pre_run_hooks", True)
            or not _hooks_idle()):
        return kernel[grid](*args, **kwargs)
    device = torch.cuda.current_device()
    try:
        key = (kernel, device, tuple(map(_specialization, args)), tuple(kwargs.items()))
        hit = _compiled.get(key)
    except (_NotCacheable, TypeError):  # TypeError: an unhashable keyword value
        return kernel[grid](*args, **kwargs)
    if hit is None:
        compiled = kernel[grid](*args, **kwargs)
        tail = _constexpr_tail(kernel, len(args), kwargs)
        if tail is None:
            _unsupported.add(kernel)
        elif isinstance(compiled, CompiledKernel):
            _compiled[key] = (compiled, tail)
        return compiled
    compiled, tail = hit
    try:
        compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
                     driver.active.get_current_stream(device), compiled.function, compiled.packed_metadata, None, None,
                     None, *args, *tail)
    except Exception:  # a launcher that takes these arguments otherwise (another Triton version): Triton's path
        _unsupported.add(kernel)
        return kernel[grid](*args, **kwargs)
    return compiled

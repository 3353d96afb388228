"""Triton launches with less host time.

``kernel[grid](...)`` (``JITFunction.run``) binds the arguments, derives their specialization and looks the compiled
kernel up on every call: several times the host time of the compiled kernel's own launcher (bench/notes/bitlinear.md,
"Tuning record"). A BitLinear training step makes seven or eight such launches, and small layers are host-bound.
``launch`` takes Triton's path on the first call for each argument specialization, keeps the compiled kernel, and
afterwards calls its launcher directly.

The cache key is a superset of what Triton specializes on: each tensor's dtype and 16-byte alignment, each integer by
value (finer than Triton's classes: divisible by 16, equal to 1, its width), floats as floats, and every keyword
(constexprs and compile options) by value. A hit is therefore the kernel Triton itself would have picked. Integers by
value make the key cheaper to build than mapping each to its class, at the price of one entry per distinct value (a
new batch size); past MAX_ENTRIES the cache starts over. Anything else (host TMA
descriptors, keyword runtime arguments, launch hooks of a profiler, the interpreter) takes Triton's own path.
Kernels that need scratch memory (device-side TMA descriptors) get it from Triton's allocator inside the compiled
launcher, as on Triton's path.
"""
from __future__ import annotations

import os

import torch

from ._common import current_cuda_device

try:  # the pieces of Triton's runtime used below; without them (other versions) every launch takes Triton's path
    from triton import knobs
    from triton.compiler import CompiledKernel
    from triton.runtime import driver
except ImportError:  # pragma: no cover - depends on the Triton version
    knobs = CompiledKernel = driver = None

# BITKERNELS_FAST_LAUNCH=0 sends every launch through Triton's JITFunction.run (to rule this module out).
ENABLED = (CompiledKernel is not None and os.environ.get("BITKERNELS_FAST_LAUNCH", "1") != "0"
           and os.environ.get("TRITON_INTERPRET", "0") != "1")

# key -> (kernel, compiled kernel, constexpr values in signature order). Keys start with id(kernel): a JITFunction
# hashes through a lock and a property (slow for a per-launch lookup); the entry keeps the kernel, so its id is never
# reused.
_compiled: dict[tuple, tuple] = {}
_unsupported: set = set()  # ids of kernels whose signature or call does not fit the fast path (kernels kept alive)
_unsupported_kernels: list = []


class _NotCacheable(Exception):
    pass


def _specialization(arg):
    # What Triton specializes an argument on, as a small hashable value: an integer's class (bit 0: == 1, bit 1:
    # divisible by 16; wider ones as a tuple with their width), the class of floats, bools and None, a tensor's dtype
    # and 16-byte alignment.
    cls = arg.__class__
    if cls is int:
        if -2**31 <= arg < 2**31:
            return (arg == 1) | ((arg & 15) == 0) << 1
        return arg == 1, arg & 15 == 0, -2**63 <= arg < 2**63
    if cls is float or cls is bool or arg is None:
        return cls
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() & 15 == 0
    raise _NotCacheable


MAX_ENTRIES = 4096  # bounds the cache: integers by value make one entry per distinct value (a new batch size)
_Tensor = torch.Tensor


def _cache_key(kernel, device: int, args: tuple, kwargs: dict) -> tuple:
    # Runs for every launch: one comprehension with exact class tests inline, integers by value (a finer key than
    # their specialization classes, see the module docstring), everything else through _specialization.
    return (id(kernel), device, *[(a.dtype, a.data_ptr() & 15 == 0) if a.__class__ is _Tensor
                                  else a if a.__class__ is int else _specialization(a) for a in args],
            *kwargs.items())


def _mark_unsupported(kernel) -> None:
    _unsupported.add(id(kernel))
    _unsupported_kernels.append(kernel)


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
    if (not ENABLED or callable(grid) or id(kernel) in _unsupported or getattr(kernel, "pre_run_hooks", True)
            or not _hooks_idle()):
        return kernel[grid](*args, **kwargs)
    device = current_cuda_device()
    try:
        key = _cache_key(kernel, device, args, kwargs)
        hit = _compiled.get(key)
    except (_NotCacheable, TypeError):  # TypeError: an unhashable keyword value
        return kernel[grid](*args, **kwargs)
    if hit is None:
        compiled = kernel[grid](*args, **kwargs)
        tail = _constexpr_tail(kernel, len(args), kwargs)
        if tail is None:
            _mark_unsupported(kernel)
        elif isinstance(compiled, CompiledKernel):
            if len(_compiled) >= MAX_ENTRIES:
                _compiled.clear()
            _compiled[key] = (kernel, compiled, tail)
        return compiled
    _, compiled, tail = hit
    try:
        compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
                     driver.active.get_current_stream(device), compiled.function, compiled.packed_metadata, None, None,
                     None, *args, *tail)
    except Exception:  # a launcher that takes these arguments otherwise (another Triton version): Triton's path
        _mark_unsupported(kernel)
        return kernel[grid](*args, **kwargs)
    return compiled

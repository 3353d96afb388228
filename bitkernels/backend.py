"""Which implementation runs an op: the Triton kernels or the PyTorch reference.

The rule, in order: an explicit ``backend=`` argument; else the ``BITKERNELS_BACKEND`` environment variable
(``triton``, ``torch`` or ``auto``); else ``auto``. ``auto`` takes Triton for CUDA tensors, and for CPU tensors only
under ``TRITON_INTERPRET=1`` (Triton's interpreter, slow, meant for tests); otherwise the reference.
Asking for ``triton`` where it cannot run is an error, never a silent fallback.
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

try:  # Triton is optional: platforms without it use the reference.
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the platform
    HAS_TRITON = False


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_can_run_on(t: torch.Tensor) -> bool:
    return HAS_TRITON and (t.is_cuda or (t.device.type == "cpu" and triton_interpreter_enabled()))


def use_triton(backend: str | None, *tensors: torch.Tensor) -> bool:
    """True if the Triton kernel should run on ``tensors``; raises if ``backend='triton'`` cannot."""
    choice = backend if backend is not None else os.environ.get("BITKERNELS_BACKEND", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {choice!r} "
                         "(from the argument or the BITKERNELS_BACKEND environment variable)")
    if choice == "torch":
        return False
    runnable = all(_triton_can_run_on(t) for t in tensors) and all(t.dtype in KERNEL_DTYPES for t in tensors)
    if choice == "triton" and not runnable:
        where = ", ".join(f"{t.device}/{t.dtype}" for t in tensors)
        raise RuntimeError(
            f"backend='triton' cannot run on tensors at {where}: the kernels need Triton installed "
            f"(found: {HAS_TRITON}), CUDA tensors (or TRITON_INTERPRET=1 set before import for CPU tensors) "
            f"and dtypes among {[str(d) for d in KERNEL_DTYPES]}. Use backend='torch' for the reference.")
    return runnable

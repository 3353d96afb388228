"""The eager BitLinear's weight-code cache: the key under which a weight's ternary codes are reused, and the count of
optimizer steps that key needs.

Fused optimizers (``torch.optim.AdamW(fused=True)``, the "adamw_torch_fused" default of recent HF Trainers) write
the parameters without bumping their version counters, so the version alone would keep stale codes after a step.
Every torch.optim step (fused or not, wrapped by accelerate or not) bumps a process-wide count instead, through a
global optimizer-step hook. The hook is registered on the first lookup with a cache, not on import: a process that
never caches codes carries no hook, and no entry can predate the hook (the lookup that makes the first key
registers it).
"""
from __future__ import annotations

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

_optimizer_steps = 0
_hook = None  # handle of the registered optimizer-step hook; None until the first lookup with a cache


def _count_optimizer_step(optimizer, args, kwargs):
    global _optimizer_steps
    _optimizer_steps += 1


def _register_hook() -> None:
    global _hook
    if _hook is None:
        _hook = register_optimizer_step_post_hook(_count_optimizer_step)


def cache_lookup(weight: torch.Tensor, per_channel: bool, eps: float, cache: dict | None):
    """-> (the cache key of ``weight``'s codes, (codes, scale) if ``cache`` holds them for it, else None).

    The key is the count of torch.optim steps taken in this process, the parameter's version counter (bumped by
    in-place updates: ``load_state_dict``, ``copy_`` under ``no_grad``), its storage, device, dtype and shape, and the
    quantization settings: eval passes and gradient-accumulation micro-steps reuse the codes. Writes through
    ``weight.data`` and optimizers outside torch.optim bypass both counters; call ``cache.clear()`` after those.
    ``cache_store`` keeps a miss's new codes under the key (one entry: the weight's latest version)."""
    if cache is None:
        return None, None
    if _hook is None:
        _register_hook()
    key = (_optimizer_steps, weight._version, weight.data_ptr(), weight.device, weight.dtype, tuple(weight.shape),
           per_channel, eps)
    hit = cache.get("entry")
    return key, (hit[1], hit[2]) if hit is not None and hit[0] == key else None


def cache_store(cache: dict, key: tuple, w_codes: torch.Tensor, w_scale: torch.Tensor) -> None:
    """Keep ``w_codes`` and ``w_scale`` in ``cache`` under ``key`` (from ``cache_lookup``), replacing any older entry."""
    cache["entry"] = (key, w_codes, w_scale)

"""Input checks shared by the functional API: one clear message per mistake, raised before any kernel runs."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32, float16, bfloat16 or float64), got {t.dtype}; "
                        "quantized codes are outputs of these ops, not inputs")


def check_min_dim(name: str, t: torch.Tensor, n: int) -> None:
    if t.dim() < n:
        raise ValueError(f"{name} must have at least {n} dimension(s), got shape {tuple(t.shape)}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors must be on one device, got {devices}")


def check_norm_weight(x: torch.Tensor, weight: torch.Tensor) -> None:
    check_float("weight", weight)
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"RMSNorm weight must have shape ({x.shape[-1]},) to match x's last dimension, "
                         f"got {tuple(weight.shape)}")
    check_same_device(x=x, weight=weight)

"""Constants and layout helpers shared by the Triton ops (``bitkernels.ops``) and their PyTorch twins
(``bitkernels.reference``): one definition, so that both sides quantize with the same epsilons and see rows alike.
Importing it needs torch only (no Triton)."""
from __future__ import annotations

import torch

WEIGHT_EPS = 1e-5  # floor of the absmean weight scale: an all-zero weight still dequantizes (to zeros)
ACT_EPS = 1e-5  # floor of the per-token absmax: an all-zero row gets codes 0 and a finite scale


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View ``x`` [..., N] as [M, N] with a unit column stride (copying only when it must)."""
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def as_tokens_by_features(a: torch.Tensor) -> torch.Tensor:
    """[B, L, D] stays; [B, H, L, d] (per-head layout, any H, e.g. GQA K/V) -> [B, L, H * d], heads concatenated
    in order as the projection wrote them."""
    if a.dim() == 4:
        b, h, l, d = a.shape
        return a.transpose(1, 2).reshape(b, l, h * d)
    return a

"""Modules: only compose the functional ops."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import functional as BF
from .reference.quantization import rmsnorm


class SubLN(nn.Module):
    """The RMSNorm BitDistill inserts before ``o_proj`` and ``down_proj``; fused into BitLinear's input quantization."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rmsnorm(x, self.weight, self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class BitLinear(nn.Linear):
    """Drop-in ``nn.Linear`` with ternary weights and int8 per-token activations (BitNet b1.58).

    Same constructor, ``weight``/``bias`` parameters and state_dict keys as ``nn.Linear``; the latent full-precision
    weight is trained through the straight-through estimator. ``subln=True`` adds a SubLN RMSNorm (``subln.weight``)
    fused with the activation quantization. ``quantize=False`` runs the plain float path (with SubLN if present).
    ``torch.compile(model, fullgraph=True)`` traces it without a graph break (custom ops ``torch.ops.bitkernels.*``,
    ternary codes recomputed every call) with no host sync inside, so ``mode="reduce-overhead"`` can capture it in
    CUDA graphs (checked by ``pytest -m gpu tests/test_bitlinear_compile.py``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 subln: bool = False, subln_eps: float = 1e-6, per_channel: bool = False, quantize: bool = True,
                 backend: str | None = None, save_input: bool = True):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.subln = SubLN(in_features, subln_eps, device=device, dtype=dtype) if subln else None
        self.per_channel = per_channel
        self.quantize = quantize
        self.backend = backend
        self.save_input = save_input  # SubLN: keep x (exact grads) or only int8 codes (see bitkernels.ops.bitlinear)
        self.frozen = False
        # Ternary codes of `weight`, reused while its version counter is unchanged (eval, gradient accumulation).
        # Eager calls only: under torch.compile the codes are recomputed each call (nothing stale in a graph).
        self._weight_cache: dict = {}

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "BitLinear":
        """A BitLinear that shares ``linear``'s weight and bias parameters (no copy)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                  dtype=w.dtype, **kwargs)
        new.weight = w
        new.bias = linear.bias
        if new.subln is not None:
            new.subln = SubLN(linear.in_features, new.subln.eps, device=w.device, dtype=w.dtype)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm_weight = None if self.subln is None else self.subln.weight
        norm_eps = self.subln.eps if self.subln is not None else 1e-6
        if self.frozen:
            return BF.bitlinear_inference(x, self.weight_codes, self.weight_scale, self.bias, norm_weight, norm_eps,
                                          backend=self.backend)
        if not self.quantize:
            h = x if self.subln is None else self.subln(x)
            return F.linear(h, self.weight, self.bias)
        return BF.bitlinear(x, self.weight, self.bias, norm_weight, norm_eps, self.per_channel,
                            backend=self.backend, weight_cache=self._weight_cache, save_input=self.save_input)

    @torch.no_grad()
    def freeze(self) -> "BitLinear":
        """Inference mode: replace the latent weight by its int8 ternary codes (buffer ``weight_codes`` [out, in])
        and scale (buffer ``weight_scale``, [] or [out]); the master weight is dropped, forward only. The state_dict
        then holds ``weight_codes``/``weight_scale`` instead of ``weight``. Returns self."""
        if self.frozen:
            return self
        if not self.quantize:
            raise RuntimeError("freeze() needs quantize=True: a float BitLinear has no ternary codes to keep")
        codes, scale = BF.ternarize_absmean(self.weight, self.per_channel, backend=self.backend)
        del self.weight
        self.register_parameter("weight", None)
        self.register_buffer("weight_codes", codes.contiguous())
        self.register_buffer("weight_scale", scale.contiguous())
        self._weight_cache.clear()
        self.frozen = True
        return self

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, subln={self.subln is not None}, "
                f"weight_scale={'per_channel' if self.per_channel else 'per_tensor'}, quantize={self.quantize}"
                + (", frozen=int8" if self.frozen else ""))


def replace_linear(module: nn.Module, filter: Callable[[str, nn.Linear], bool] | None = None,
                   **bitlinear_kwargs) -> list[str]:
    """Swap, in place, every ``nn.Linear`` under ``module`` for which ``filter(qualified_name, linear)`` is true
    (all of them by default) by a BitLinear sharing its parameters. Returns the qualified names replaced."""
    replaced = []
    for parent_name, parent in list(module.named_modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or isinstance(child, BitLinear):
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if filter is None or filter(name, child):
                setattr(parent, child_name, BitLinear.from_linear(child, **bitlinear_kwargs))
                replaced.append(name)
    return replaced

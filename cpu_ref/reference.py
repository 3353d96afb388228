"""The exact integer twin of the packed model, in plain PyTorch: the ground truth the kernel must equal bit for bit.

The PyTorch student (bitkernels BitLinear) computes ``F.linear(codes_x * s_x, codes_w * s_w)`` in float32: each
fake-quantized value and each partial sum is rounded, so its outputs differ from the exact integer product by float
rounding, and a later activation can land on the other side of a rounding boundary (one int8 step). The packed
kernel computes the exact int32 sum, then ``float(acc) * (s_x * s_w) + bias``. ``ExactBitLinear`` does the same in
torch (int32 matmul), so a model built with ``exact_reference`` must give the packed model's logits exactly.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from bitkernels.modules import BitLinear
from bitkernels.reference import quantize_activations_int8, rmsnorm, ternarize_absmean


EXACT_F32_TERMS = 2 ** 24 // 128  # sums of this many int8 x ternary products stay exact in float32


class ExactBitLinear(nn.Module):
    def __init__(self, layer: BitLinear):
        super().__init__()
        codes, scale = ternarize_absmean(layer.weight.detach(), per_channel=layer.per_channel)
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale.reshape(-1))
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float())
        self.register_buffer("norm_weight", None if layer.subln is None else layer.subln.weight.detach().float())
        self.norm_eps = 1e-6 if layer.subln is None else layer.subln.eps
        self._codes_f32 = None  # float32 copy of the codes, made at the first forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float() if self.norm_weight is None else rmsnorm(x, self.norm_weight, self.norm_eps)
        xc, xs = quantize_activations_int8(h)
        xc = xc.reshape(-1, xc.shape[-1])
        if self.in_features <= EXACT_F32_TERMS:
            # A float32 matmul of these integers is exact (every partial sum, in any order or blocking, is an
            # integer of magnitude <= 128 K <= 2^24) and runs on BLAS: much faster than torch's int32 matmul.
            if self._codes_f32 is None:
                self._codes_f32 = self.codes.float()
            acc = xc.float() @ self._codes_f32.T
        else:
            acc = (xc.to(torch.int32) @ self.codes.to(torch.int32).T).float()
        y = acc * (xs.reshape(-1, 1) * self.scale.reshape(1, -1))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)


def exact_reference(student: nn.Module) -> nn.Module:
    """A copy of ``student`` with every BitLinear replaced by ExactBitLinear (the student is not changed)."""
    model = copy.deepcopy(student)
    for name, m in list(model.named_modules()):
        if isinstance(m, BitLinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, ExactBitLinear(m))
    return model.eval()

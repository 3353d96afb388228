"""Fused projections: q/k/v of a decoder layer read the same input, and so do gate/up; stacked into one matrix each,
they cost one product (one kernel call, one OpenMP fork/join) instead of three or two: 7 -> 4 calls a layer.

``fuse_projections`` does it in place without a second copy of the weights: the stacked matrix is one new buffer
and each part's weight becomes a row view of it, so the parts keep their modules, names, state dict and the HF
forward. ``fused_product`` is what the decode loop (``cpu_ref.decoder``) calls: one product over the stacked rows
when the parts are stacked and of one kind (PackedBitLinear, or plain nn.Linear), else each part and a cat.

Numerics: a PackedBitLinear row of the stacked product is the very same integer sum and epilogue as the part's own
(each row keeps its part's weight scale, as a per-row scale), so stacked == separate bit for bit. For nn.Linear the
stacked matmul may round differently from three separate ones (the BLAS blocking can depend on N).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitdistill.hf_layout import any_decoder_layers

from .model import PackedBitLinear
from .ops import PreparedBitLinear

GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))


def projection_groups(layer: nn.Module) -> list[list[nn.Module]]:
    """The [q, k, v] and [gate, up] modules of one decoder layer (those it has)."""
    groups = []
    for parent_name, names in GROUPS:
        parent = getattr(layer, parent_name, None)
        parts = [getattr(parent, n, None) for n in names] if parent is not None else []
        if parts and all(p is not None for p in parts):
            groups.append(parts)
    return groups


def _kind(parts: list[nn.Module]) -> str | None:
    """'packed' or 'linear' when the parts can share one product, else None."""
    k = parts[0].in_features if all(hasattr(p, "in_features") for p in parts) else None
    if k is None or any(p.in_features != k for p in parts):
        return None
    if all(isinstance(p, PackedBitLinear) and p.subln_weight is None for p in parts):
        return "packed"
    if all(type(p) is nn.Linear for p in parts):  # exactly nn.Linear: subclasses (BitLinear) compute differently
        w = parts[0].weight
        if all(p.weight.dtype == w.dtype and p.weight.device == w.device for p in parts) and \
                len({p.bias is None for p in parts}) == 1:
            return "linear"
    return None


def _weight(p: nn.Module) -> torch.Tensor:
    return p.qweight if isinstance(p, PackedBitLinear) else p.weight


def stacked_rows(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """A [sum of rows, K] view over ``tensors`` when they are consecutive rows of one buffer, else None."""
    t0 = tensors[0]
    if any(t.dim() != 2 or t.dtype != t0.dtype or t.shape[1] != t0.shape[1] or not t.is_contiguous() for t in tensors):
        return None
    ptr, step = t0.data_ptr(), t0.element_size()
    for t in tensors:
        if t.data_ptr() != ptr:
            return None
        ptr += t.numel() * step
    rows = sum(t.shape[0] for t in tensors)
    base = t0.detach()
    if base.untyped_storage().nbytes() < (base.storage_offset() + rows * t0.shape[1]) * step:
        return None
    return base.as_strided((rows, t0.shape[1]), (t0.shape[1], 1))


@torch.no_grad()
def fuse_projections(model: nn.Module) -> int:
    """In place: stack the q/k/v and the gate/up weights of every decoder layer into one buffer each (the parts'
    weights become row views; no extra memory). Applies to PackedBitLinear parts without SubLN and to plain
    nn.Linear parts; others are left alone. Idempotent. Returns how many groups are stacked."""
    layers = any_decoder_layers(model)
    count = 0
    for layer in layers if layers is not None else []:
        for parts in projection_groups(layer):
            kind = _kind(parts)
            if kind is None:
                continue
            if stacked_rows([_weight(p) for p in parts]) is None:
                stacked = torch.cat([_weight(p).detach() for p in parts])
                row = 0
                for p in parts:
                    rows = p.out_features
                    if kind == "packed":
                        p.qweight = stacked[row:row + rows]
                    else:
                        p.weight = nn.Parameter(stacked[row:row + rows], requires_grad=p.weight.requires_grad)
                    row += rows
            count += 1
    return count


class FusedProduct:
    """Callable x [..., K] -> list of outputs: [one tensor [..., sum of the parts' out_features]] when the parts are
    stacked (one product), else one tensor per part."""

    def __init__(self, parts: list[nn.Module]):
        self.parts = parts
        self.out_features = sum(p.out_features for p in parts)
        kind = _kind(parts)
        stacked = stacked_rows([_weight(p) for p in parts]) if kind else None
        self.kind = kind if stacked is not None else "separate"
        if self.kind == "packed":
            scales = torch.cat([p.weight_scale.expand(p.out_features) for p in parts]).contiguous()
            bias = None
            if any(p.bias is not None for p in parts):  # zeros for a part without: y + 0 == y
                bias = torch.cat([p.bias if p.bias is not None else torch.zeros(p.out_features) for p in parts])
            self.prepared = PreparedBitLinear(stacked, scales, parts[0].in_features, bias)
            self.n_threads = parts[0].n_threads
        elif self.kind == "linear":
            self.weight = stacked
            self.bias = None if parts[0].bias is None else torch.cat([p.bias.detach() for p in parts])

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.kind == "packed":
            dtype = x.dtype
            if dtype is not torch.float32 or not x.is_contiguous():
                return [self.prepared(x.to(torch.float32).contiguous(), None, self.n_threads).to(dtype)]
            return [self.prepared(x, None, self.n_threads)]
        if self.kind == "linear":
            return [F.linear(x, self.weight, self.bias)]
        return [p(x) for p in self.parts]

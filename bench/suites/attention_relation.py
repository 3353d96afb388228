"""Attention-relation distillation loss (L_AD over Q, K, V): ours (flash-style Triton) vs the PyTorch reference,
eager and under torch.compile, forward + backward into the student.

Shapes of the issue: D=2048 on both sides, 16 relation heads (d_r = 128), bf16, L=1024 x B=8 and L=8192 x B=1; plus
L=32768 x B=1 where the reference cannot hold its 64 GiB-per-matrix relations. The op is matrix-bound: ``flops``
counts the products our kernels execute (forward 2, backward 3 products of 2 * B * R * L^2 * d_r each, per relation),
so TFLOP/s over the measured bf16 matrix rate is the fraction of the floor reached. The reference executes 4 (no
recompute) where we execute 5. ``grad_bytes`` (the three student gradients) is part of every peak.
"""
from __future__ import annotations

import torch

import bitkernels.reference as ref
from bench.harness import Case
from bitkernels import ops

HEADS = 16
WIDTH = 2048
SHAPES = [(8, 1024), (1, 8192), (1, 32768)]


def _fwd_bwd(loss_fn, qkv_t, qkv_s, heads):
    def run():
        for s in qkv_s:
            s.grad = None
        loss = loss_fn(qkv_t, qkv_s, heads)
        loss.backward()
        return loss
    return run


def _fwd(loss_fn, qkv_t, qkv_s, heads):
    def run():
        with torch.no_grad():
            return loss_fn(qkv_t, qkv_s, heads)
    return run


def cases(device: torch.device, quick: bool):
    dtype = torch.bfloat16
    # quick (CPU, Triton's interpreter): one tiny shape that still crosses tiles, only to show the suite runs
    shapes = [(1, 32)] if quick else SHAPES
    width, heads = (32, 4) if quick else (WIDTH, HEADS)
    ref_compiled = torch.compile(ref.attention_relation_distill_loss, dynamic=False)
    for batch, length in shapes:
        # A student close to its teacher, as after Stage 2: relations are neither identical nor unrelated.
        qkv_t = [torch.randn(batch, length, width, device=device, dtype=dtype) for _ in range(3)]
        qkv_s = [(t.float() + 0.5 * torch.randn_like(t, dtype=torch.float32)).to(dtype).requires_grad_()
                 for t in qkv_t]
        d_r = width // heads
        product = 2 * batch * heads * length * length * d_r
        shape = f"B={batch} L={length} D={width} R={heads}"
        grad_bytes = 3 * batch * length * width * 2
        huge = length > 8192  # the reference's relations alone would exceed the GPU (16 * L^2 * 4 B each)
        impls = {"ours": _fwd_bwd(ops.attention_relation_distill_loss, qkv_t, qkv_s, heads)}
        if not huge:
            impls["ref_eager"] = _fwd_bwd(ref.attention_relation_distill_loss, qkv_t, qkv_s, heads)
            impls["ref_compile"] = _fwd_bwd(ref_compiled, qkv_t, qkv_s, heads)
        yield Case("attn_rel", "relation_distill Q/K/V fwd+bwd", shape, impls, flops=3 * 5 * product,
                   notes={"grad_bytes": grad_bytes})
        impls = {"ours": _fwd(ops.attention_relation_distill_loss, qkv_t, qkv_s, heads)}
        if not huge:
            impls["ref_eager"] = _fwd(ref.attention_relation_distill_loss, qkv_t, qkv_s, heads)
        yield Case("attn_rel", "relation_distill Q/K/V fwd", shape, impls, flops=3 * 2 * product)

"""Quantization kernels: ours vs the PyTorch reference, eager and under torch.compile.

Shapes: the linear layers of Qwen3-0.6B / 1.7B / 4B (hidden -> intermediate and back) at 8192 tokens, bf16.
The kernels are memory-bound: bytes_moved counts each input read once and each output written once, so GB/s over
the measured copy bandwidth is the fraction of the floor reached.
"""
from __future__ import annotations

import torch

import bitkernels.reference as ref
from bench.harness import Case
from bitkernels import ops
from bitkernels.ops import _common

MODELS = {"qwen3-0.6b": (1024, 3072), "qwen3-1.7b": (2048, 6144), "qwen3-4b": (2560, 9728)}
TOKENS = 8192


def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def _with_tiling(fn, **settings):
    """The same op under other row-tiling settings of ``_common``, to show what the shipped choice buys there.
    ``row_tiling`` is cached per row length: cleared on the way in and out, or the shipped tiling would be timed."""
    def run(*args):
        saved = {name: getattr(_common, name) for name in settings}
        for name, value in settings.items():
            setattr(_common, name, value)
        _common.row_tiling.cache_clear()
        try:
            return fn(*args)
        finally:
            for name, value in saved.items():
                setattr(_common, name, value)
            _common.row_tiling.cache_clear()
    return run


def _long_row_variants(fn, x, *args):
    """Rows past SINGLE_PASS_MAX: the same call chunked (two or three passes over the row) and as one padded
    register tile, beside the shipped head + tail tiles."""
    if _common.next_power_of_2(x.shape[-1]) <= _common.SINGLE_PASS_MAX:
        return {}
    chunked = _with_tiling(fn, SPLIT_ROW_MAX=0)
    one_tile = _with_tiling(fn, SINGLE_PASS_MAX=_common.MAX_ROW)
    return {"ours_chunked": lambda: chunked(x, *args), "ours_rows_in_registers": lambda: one_tile(x, *args)}


def _fwd_bwd(fn, x, w, dy):
    def run():
        x.grad = None
        w.grad = None
        fn(x, w).backward(dy)
    return run


def cases(device: torch.device, quick: bool):
    dtype = torch.bfloat16
    models = {"tiny": (128, 384)} if quick else MODELS
    tokens = 64 if quick else TOKENS
    el = torch.tensor([], dtype=dtype).element_size()
    ref_rmsnorm_fq_c = _compiled(ref.rmsnorm_fake_quantize)
    for model, (hidden, inter) in models.items():
        for k in (hidden, inter):
            x = torch.randn(tokens, k, device=device, dtype=dtype)
            nw = torch.rand(k, device=device, dtype=dtype) + 0.5
            shape = f"{model} M={tokens} K={k}"
            act_bytes = tokens * k * (el + 1) + tokens * 4
            impls = {
                "ours": lambda x=x: ops.quantize_activations_int8(x),
                "ref_eager": lambda x=x: ref.quantize_activations_int8(x),
                "ref_compile": lambda x=x, f=_compiled(ref.quantize_activations_int8): f(x),
            }
            impls.update(_long_row_variants(ops.quantize_activations_int8, x))
            yield Case("quant", "quantize_activations_int8", shape, impls, bytes_moved=act_bytes)
            impls = {
                "ours": lambda x=x, nw=nw: ops.rmsnorm_quantize_int8(x, nw),
                "ref_eager": lambda x=x, nw=nw: ref.rmsnorm_quantize_int8(x, nw),
                "ref_compile": lambda x=x, nw=nw, f=_compiled(ref.rmsnorm_quantize_int8): f(x, nw),
            }
            impls.update(_long_row_variants(ops.rmsnorm_quantize_int8, x, nw))
            yield Case("quant", "rmsnorm_quantize_int8", shape, impls, bytes_moved=act_bytes + k * el)
            xg = x.clone().requires_grad_()
            nwg = nw.clone().requires_grad_()
            dy = torch.randn_like(x)
            # fwd reads x, writes y; bwd reads dy and x, writes dx (weights and per-row stats are negligible).
            yield Case("quant", "rmsnorm_fake_quantize fwd+bwd", shape, {
                "ours": _fwd_bwd(ops.rmsnorm_fake_quantize, xg, nwg, dy),
                "ref_eager": _fwd_bwd(ref.rmsnorm_fake_quantize, xg, nwg, dy),
                "ref_compile": _fwd_bwd(ref_rmsnorm_fq_c, xg, nwg, dy),
            }, bytes_moved=5 * tokens * k * el)
        for out_f, in_f in ((inter, hidden), (hidden, inter)):
            w = torch.randn(out_f, in_f, device=device, dtype=dtype) * 0.02
            shape = f"{model} W={out_f}x{in_f}"
            for per_channel in (False, True):
                name = f"ternarize_absmean {'per_channel' if per_channel else 'per_tensor'}"
                yield Case("quant", name, shape, {
                    "ours": lambda w=w, pc=per_channel: ops.ternarize_absmean(w, pc),
                    "ref_eager": lambda w=w, pc=per_channel: ref.ternarize_absmean(w, pc),
                    "ref_compile": lambda w=w, pc=per_channel, f=_compiled(ref.ternarize_absmean): f(w, pc),
                }, bytes_moved=w.numel() * (el + 1), notes={"passes_over_w": 1 if per_channel else 2})
            if quick:
                break

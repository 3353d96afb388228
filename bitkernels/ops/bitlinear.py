"""BitLinear forward + backward on int8 tensor cores, saving int8 codes instead of the bf16 input.

Forward:  (SubLN RMSNorm +) per-token int8 quantization of x in one pass (``rmsnorm_quant`` / ``act_quant``), then
          ``int8_matmul`` with the two scales and the bias in its epilogue. The ternary weight codes are made once
          per weight version, not once per call (the module's cache); when they are made, their pass shares one
          launch with x's quantization (``ternarize_and_quantize``: 3 launches a forward instead of 4).
Backward: straight-through estimator. grad_h = grad_y @ (Wq*s), then the SubLN RMSNorm backward (dx written over
          grad_h), then grad_W = grad_y^T @ (xq*a/127), both GEMMs on cuBLAS over dequantized copies made right
          before and freed right after: Wq*s by ``dequantize_int8``; xq*a/127 by the RMSNorm backward itself from
          the same read of x (or of the codes) that gives dx (``rmsnorm_backward_and_dequantize``: one pass over x,
          not two) while all of it fits ``GRAD_WEIGHT_BLOCK_BYTES``, else a block of K's columns at a time, each
          with its slice of grad_W's GEMM (``bitlinear_grad_weight_blocks``). The backward's peak is then its
          outputs plus the larger of Wq*s and one block, where one [M, K] copy of xq*a/127 and grad_h beside dx
          used to be two [M, K] buffers more than plain nn.Linear's.
Saved:    without SubLN: the int8 activation codes + fp32 per-token scale (1 byte per element; plain nn.Linear
          keeps the bf16 input, 2). With SubLN the RMSNorm backward needs x*rstd, two choices:
          ``save_input=True`` (the default of BitLinear and of ``bitlinear``): keep x only (2 bytes per element,
          half of plain RMSNorm+Linear's x and normalized x; plus the 4-byte 1/rms per row) and rebuild the codes in
          the backward: the reference's exact gradients.
          ``save_input=False``: keep the codes only (1 byte per element) and rebuild x*rstd as codes*scale / norm_weight
          (the quantized value, as the straight-through estimator already treats it): x's and the norm weight's
          gradients then carry the int8 rounding (|error| <= absmax/254 per element before the division by the norm
          weight; ~2e-3 relative L2 on dx in the tests), and elements whose norm weight is exactly 0 get none.
Layers:   ``bitlinear_forward_impl`` / ``bitlinear_backward_impl`` (``ops.bitlinear_impl``) do the work on plain
          tensors; eager calls wrap them in ``BitLinearFunction`` here (lowest Python overhead per call), torch.compile
          in the custom ops of ``bitlinear_library`` (capturable in one graph and in CUDA graphs). ``bitlinear`` picks
          between the two; the eager path reuses the weight's codes through ``ops.weight_cache``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .._base import ACT_EPS, WEIGHT_EPS
from . import bitlinear_library as _library  # registers torch.ops.bitkernels.*
from ._common import check_row_length
from .bitlinear_impl import bitlinear_backward_impl, bitlinear_forward_impl, compute_dtype, keeps_input
from .bitlinear_impl import bitlinear_grad_input, bitlinear_grad_weight  # noqa: F401  (re-exported, as before)
from .ternarize import ternarize_absmean
from .ternarize_and_quantize import ternarize_and_quantize_forward
from .weight_cache import cache_lookup, cache_store


class _Settings(NamedTuple):
    """The eager Function's arguments that take no gradient, as one argument of ``apply``."""
    w_codes: torch.Tensor  # made under no_grad from the weight: not an autograd input (saved for backward all the same)
    w_scale: torch.Tensor
    norm_eps: float
    act_eps: float
    save_input: bool
    out_dtype: torch.dtype
    quantized: tuple | None  # x's (codes, scale, 1/rms) when made in the launch that made w_codes, else None


class BitLinearFunction(torch.autograd.Function):
    """The eager path: one Python autograd node, the cheapest per call (no dispatcher round trips); torch.compile
    goes through the custom ops of ``bitlinear_library`` instead, which run the same two functions of
    ``bitlinear_impl``. Its inputs are the four tensors that take gradients, the rest rides in one ``settings``
    tuple: each argument of ``apply`` and each saved slot costs host time, measurably so for the ten arguments and
    seven slots this had. The weight codes are still saved through ``save_for_backward``, so saved-tensor hooks
    (offloading, checkpointing) see them as before."""

    @staticmethod
    def forward(ctx, x, weight, bias, norm_weight, settings: _Settings):
        y, codes, a_scale, rstd = bitlinear_forward_impl(x, bias, norm_weight, settings.w_codes, settings.w_scale,
                                                         settings.norm_eps, settings.act_eps, settings.out_dtype,
                                                         settings.quantized)
        ctx.keeps_x = keeps_input(norm_weight, settings.save_input)
        if ctx.keeps_x:
            ctx.save_for_backward(x, rstd, norm_weight, settings.w_codes, settings.w_scale)
        else:
            ctx.save_for_backward(codes, a_scale, rstd, norm_weight, settings.w_codes, settings.w_scale)
        ctx.norm_eps, ctx.act_eps = settings.norm_eps, settings.act_eps  # not the tuple: it holds the codes too
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = weight.dtype if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        if ctx.keeps_x:
            (x, rstd, norm_weight, w_codes, w_scale), codes, a_scale = ctx.saved_tensors, None, None
        else:
            x, (codes, a_scale, rstd, norm_weight, w_codes, w_scale) = None, ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_x, grad_w, grad_b, grad_nw = bitlinear_backward_impl(
            grad_y, x, codes, a_scale, rstd, w_codes, w_scale, norm_weight, ctx.norm_eps, ctx.act_eps, ctx.x_dtype,
            ctx.weight_dtype, ctx.bias_dtype, need[0] or need[3], need[1], need[2])
        if grad_x is not None and len(ctx.x_shape) != 2:
            grad_x = grad_x.reshape(ctx.x_shape)
        return grad_x, grad_w, grad_b, grad_nw, None


def bitlinear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
              norm_weight: torch.Tensor | None = None, norm_eps: float = 1e-6, per_channel: bool = False, *,
              act_eps: float = ACT_EPS, weight_eps: float = WEIGHT_EPS, weight_cache: dict | None = None,
              save_input: bool = True) -> torch.Tensor:
    """BitLinear on int8 tensor cores; same value as ``reference.bitlinear`` up to its bf16 matmul rounding (ours
    accumulates exactly in int32 and rounds once). See the module docstring for what is saved for backward.

    Under torch.compile it runs as the custom ops ``torch.ops.bitkernels.*`` (one graph, CUDA-graph capturable),
    ternarizing the weight every call: ``weight_cache`` is Python state a captured graph would not re-run, and in
    training the weight changes every step anyway. Eager calls keep the autograd Function and the cache."""
    if norm_weight is not None:
        check_row_length(x.shape[-1])  # the RMSNorm backward keeps rows in registers: refuse too-long rows up front
    out_dtype = compute_dtype(x)
    if torch.compiler.is_compiling():
        w_codes, w_scale = _library.ternarize_absmean(weight.detach(), per_channel, weight_eps)
        return _library.bitlinear_forward(x, weight, bias, norm_weight, w_codes, w_scale, norm_eps, act_eps,
                                          save_input, out_dtype)[0]
    key, hit = cache_lookup(weight, per_channel, weight_eps, weight_cache)
    quantized = None
    if hit is not None:
        w_codes, w_scale = hit
    elif per_channel:
        w_codes, w_scale = ternarize_absmean(weight, True, weight_eps)
    else:  # new codes: their pass shares a launch with x's quantization
        w_codes, w_scale, codes, a_scale, rstd = ternarize_and_quantize_forward(weight, x, norm_weight, norm_eps,
                                                                                act_eps, weight_eps)
        quantized = (codes, a_scale, rstd)
    if hit is None and key is not None:
        cache_store(weight_cache, key, w_codes, w_scale)
    return BitLinearFunction.apply(x, weight, bias, norm_weight,
                                   _Settings(w_codes, w_scale, norm_eps, act_eps, save_input, out_dtype, quantized))


def bitlinear_inference(x: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor,
                        bias: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
                        norm_eps: float = 1e-6, act_eps: float = ACT_EPS) -> torch.Tensor:
    """Forward only, from frozen int8 weight codes [N, K] and their scale ([] or [N]); no master weight."""
    bias = None if bias is None else bias.detach()
    norm_weight = None if norm_weight is None else norm_weight.detach()
    if torch.compiler.is_compiling():  # the forward op; the codes stand in for the latent weight, which it never reads
        return _library.bitlinear_forward(x.detach(), w_codes, bias, norm_weight, w_codes, w_scale, norm_eps, act_eps,
                                          False, compute_dtype(x))[0]
    return bitlinear_forward_impl(x.detach(), bias, norm_weight, w_codes, w_scale, norm_eps, act_eps,
                                  compute_dtype(x))[0]

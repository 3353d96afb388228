"""BitLinear as PyTorch custom ops (``torch.ops.bitkernels.*``): what torch.compile and CUDA graphs capture.

The eager ``BitLinearFunction`` launches its Triton kernels from Python on every call, and Dynamo cannot trace
that (a Python weight-code cache, autotuned launchers). These ops are opaque to the compiler: their fake
implementations give shapes and dtypes, ``register_autograd`` wires the straight-through backward, and at run time
each calls the very functions the eager Function calls (``bitlinear_impl``'s forward and backward).

    ternarize_absmean(weight, per_channel, eps)                      -> (int8 codes, fp32 scale [] or [rows])
    bitlinear_forward(x, weight, bias?, norm_weight?, w_codes, w_scale, norm_eps, act_eps, save_input, out_dtype)
                                                                     -> (y, x codes [M, K], x scale [M], rstd)
    bitlinear_backward(grad_y, x?, codes?, a_scale?, rstd?, w_codes, w_scale, norm_weight?, ..., which grads)
                                                                     -> (grad_x [M, K], grad_W, grad_bias, grad_norm)

Custom ops return no None and no views of their inputs: rstd without SubLN and the gradients not asked for are empty
tensors (shape [0]). ``bitlinear_forward`` takes the latent ``weight`` without reading it, so that autograd routes
the weight's straight-through gradient to it. Nothing here syncs with the host or depends on Python state between
calls, so a captured graph replays it as is (the Triton autotuner runs in cudagraph-trees' eager warm-up run).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .bitlinear_impl import bitlinear_backward_impl, bitlinear_forward_impl, keeps_input
from .ternarize import ternarize_absmean as _ternarize_absmean


def _placeholder(like: Tensor, dtype: torch.dtype) -> Tensor:
    """What an op returns where the eager path has None."""
    return torch.empty(0, device=like.device, dtype=dtype)


@torch.library.custom_op("bitkernels::ternarize_absmean", mutates_args=())
def ternarize_absmean(weight: Tensor, per_channel: bool, eps: float) -> tuple[Tensor, Tensor]:
    codes, scale = _ternarize_absmean(weight, per_channel, eps)
    return codes, scale


@ternarize_absmean.register_fake
def _(weight, per_channel, eps):
    if per_channel:  # rows of a [..., K] weight, as ops.ternarize lays them out
        rows = math.prod(weight.shape[:-1])
        return (weight.new_empty((rows, weight.shape[-1]), dtype=torch.int8),
                weight.new_empty((rows,), dtype=torch.float32))
    return weight.new_empty(weight.shape, dtype=torch.int8), weight.new_empty((), dtype=torch.float32)


def _ternarize_setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)


def _ternarize_backward(ctx, grad_codes, grad_scale):
    # Not differentiable on purpose: BitLinear's straight-through gradient reaches the weight through
    # bitlinear_forward (as the reference's fake quantization passes none through the scale either).
    return None, None, None


ternarize_absmean.register_autograd(_ternarize_backward, setup_context=_ternarize_setup_context)


@torch.library.custom_op("bitkernels::bitlinear_forward", mutates_args=())
def bitlinear_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], norm_weight: Optional[Tensor],
                      w_codes: Tensor, w_scale: Tensor, norm_eps: float, act_eps: float, save_input: bool,
                      out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # save_input only tells setup_context what to keep; the forward's work is the same either way.
    y, codes, a_scale, rstd = bitlinear_forward_impl(x, bias, norm_weight, w_codes, w_scale, norm_eps, act_eps,
                                                     out_dtype)
    return y, codes, a_scale, _placeholder(x, torch.float32) if rstd is None else rstd


@bitlinear_forward.register_fake
def _(x, weight, bias, norm_weight, w_codes, w_scale, norm_eps, act_eps, save_input, out_dtype):
    m, k, n = math.prod(x.shape[:-1]), x.shape[-1], w_codes.shape[0]
    return (x.new_empty((*x.shape[:-1], n), dtype=out_dtype),
            x.new_empty((m, k), dtype=torch.int8),
            x.new_empty((m,), dtype=torch.float32),
            x.new_empty((m,) if norm_weight is not None else (0,), dtype=torch.float32))


def _forward_setup_context(ctx, inputs, output):
    x, weight, bias, norm_weight, w_codes, w_scale, norm_eps, act_eps, save_input, out_dtype = inputs
    _, codes, a_scale, rstd = output
    ctx.mark_non_differentiable(codes, a_scale, rstd)
    if keeps_input(norm_weight, save_input):  # x itself (an input: no copy), the codes are rebuilt in backward
        ctx.save_for_backward(x, None, None, rstd, w_codes, w_scale, norm_weight)
    else:
        ctx.save_for_backward(None, codes, a_scale, None if norm_weight is None else rstd, w_codes, w_scale,
                              norm_weight)
    ctx.norm_eps, ctx.act_eps = norm_eps, act_eps
    ctx.x_shape, ctx.x_dtype, ctx.weight_dtype = x.shape, x.dtype, weight.dtype
    ctx.bias_dtype = weight.dtype if bias is None else bias.dtype


def _forward_backward(ctx, grad_y, grad_codes, grad_a_scale, grad_rstd):
    x, codes, a_scale, rstd, w_codes, w_scale, norm_weight = ctx.saved_tensors
    need = ctx.needs_input_grad  # (x, weight, bias, norm_weight, ...): known when AOTAutograd traces the backward
    grad_input = need[0] or need[3]
    grad_x, grad_w, grad_b, grad_nw = bitlinear_backward(
        grad_y, x, codes, a_scale, rstd, w_codes, w_scale, norm_weight, ctx.norm_eps, ctx.act_eps, ctx.x_dtype,
        ctx.weight_dtype, ctx.bias_dtype, grad_input, need[1], need[2])
    return (grad_x.reshape(ctx.x_shape) if need[0] else None, grad_w if need[1] else None,
            grad_b if need[2] else None, grad_nw if need[3] else None, None, None, None, None, None, None)


bitlinear_forward.register_autograd(_forward_backward, setup_context=_forward_setup_context)


@torch.library.custom_op("bitkernels::bitlinear_backward", mutates_args=())
def bitlinear_backward(grad_y: Tensor, x: Optional[Tensor], codes: Optional[Tensor], a_scale: Optional[Tensor],
                       rstd: Optional[Tensor], w_codes: Tensor, w_scale: Tensor, norm_weight: Optional[Tensor],
                       norm_eps: float, act_eps: float, x_dtype: torch.dtype, weight_dtype: torch.dtype,
                       bias_dtype: torch.dtype, grad_input: bool, grad_weight: bool,
                       grad_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grads = bitlinear_backward_impl(grad_y, x, codes, a_scale, rstd, w_codes, w_scale, norm_weight, norm_eps,
                                    act_eps, x_dtype, weight_dtype, bias_dtype, grad_input, grad_weight, grad_bias)
    return tuple(_placeholder(grad_y, grad_y.dtype) if g is None else g for g in grads)


@bitlinear_backward.register_fake
def _(grad_y, x, codes, a_scale, rstd, w_codes, w_scale, norm_weight, norm_eps, act_eps, x_dtype, weight_dtype,
      bias_dtype, grad_input, grad_weight, grad_bias):
    m, (n, k) = math.prod(grad_y.shape[:-1]), w_codes.shape

    def out(asked, shape, dtype):
        return grad_y.new_empty(shape, dtype=dtype) if asked else grad_y.new_empty((0,))

    return (out(grad_input, (m, k), x_dtype), out(grad_weight, (n, k), weight_dtype), out(grad_bias, (n,), bias_dtype),
            out(grad_input and norm_weight is not None, (k,), None if norm_weight is None else norm_weight.dtype))

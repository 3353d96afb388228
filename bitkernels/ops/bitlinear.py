"""BitLinear forward + backward on int8 tensor cores, saving int8 codes instead of the bf16 input.

Forward:  (SubLN RMSNorm +) per-token int8 quantization of x in one pass (``rmsnorm_quant`` / ``act_quant``), then
          ``int8_matmul`` with the two scales and the bias in its epilogue. The ternary weight codes are made once
          per weight version, not once per call (the module's cache); when they are made, their pass shares one
          launch with x's quantization (``ternarize_and_quantize``: 3 launches a forward instead of 4).
Backward: straight-through estimator. grad_h = grad_y @ (Wq*s), then the SubLN RMSNorm backward, then
          grad_W = grad_y^T @ (xq*a/127), both GEMMs on cuBLAS over dequantized copies made right before and freed
          right after: Wq*s by ``dequantize_int8``, xq*a/127 by the RMSNorm backward itself from the same read of x
          (or of the codes) that gives dx (``rmsnorm_backward_and_dequantize``): one pass over x, not two.
Saved:    without SubLN: the int8 activation codes + fp32 per-token scale (1 byte per element; plain nn.Linear
          keeps the bf16 input, 2). With SubLN the RMSNorm backward needs x*rstd, two choices:
          ``save_input=True`` (the default of BitLinear and of ``bitlinear``): keep x only (2 bytes per element,
          half of plain RMSNorm+Linear's x and normalized x; plus the 4-byte 1/rms per row) and rebuild the codes in
          the backward: the reference's exact gradients.
          ``save_input=False``: keep the codes only (1 byte per element) and rebuild x*rstd as codes*scale / norm_weight
          (the quantized value, as the straight-through estimator already treats it): x's and the norm weight's
          gradients then carry the int8 rounding (|error| <= absmax/254 per element before the division by the norm
          weight; ~2e-3 relative L2 on dx in the tests), and elements whose norm weight is exactly 0 get none.
Layers:   ``bitlinear_forward_impl`` / ``bitlinear_backward_impl`` do the work on plain tensors; eager calls wrap them
          in ``BitLinearFunction`` (lowest Python overhead per call), torch.compile in the custom ops of
          ``bitlinear_library`` (capturable in one graph and in CUDA graphs). ``bitlinear`` picks between the two.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..reference.bitlinear import bitlinear_grad_weight  # a plain cuBLAS GEMM: the reference is the op
from ..reference.quantization import ACT_EPS, WEIGHT_EPS
from ._common import as_rows, check_row_length
from .dequantize import dequantize_int8
from .int8_matmul import int8_matmul
from .rmsnorm_quant import rmsnorm_backward, rmsnorm_backward_and_dequantize
from .ternarize import ternarize_absmean
from .ternarize_and_quantize import quantize_input, ternarize_and_quantize_forward


# Fused optimizers (``torch.optim.AdamW(fused=True)``, the "adamw_torch_fused" default of recent HF Trainers) write
# the parameters without bumping their version counters, so the version alone would keep stale codes after a step.
# Every torch.optim step (fused or not, wrapped by accelerate or not) bumps this count instead.
_optimizer_steps = 0


def _count_optimizer_step(optimizer, args, kwargs):
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def _cache_lookup(weight: torch.Tensor, per_channel: bool, eps: float, cache: dict | None):
    """-> (the cache key of ``weight``'s codes, (codes, scale) if ``cache`` holds them for it, else None).

    The key is the count of torch.optim steps taken in this process, the parameter's version counter (bumped by
    in-place updates: ``load_state_dict``, ``copy_`` under ``no_grad``), its storage, device, dtype and shape, and the
    quantization settings: eval passes and gradient-accumulation micro-steps reuse the codes. Writes through
    ``weight.data`` and optimizers outside torch.optim bypass both counters; call ``cache.clear()`` after those.
    ``bitlinear`` stores a miss's new codes under the key (one entry: the weight's latest version)."""
    if cache is None:
        return None, None
    key = (_optimizer_steps, weight._version, weight.data_ptr(), weight.device, weight.dtype, tuple(weight.shape),
           per_channel, eps)
    hit = cache.get("entry")
    return key, (hit[1], hit[2]) if hit is not None and hit[0] == key else None


def bitlinear_grad_input(grad_y: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """grad_x [M, K] = grad_y [M, N] @ (Wq * s), Wq int8 [N, K], s per tensor [] or per output channel [N]; the
    dequantized weight is rounded to grad_y's dtype, as the reference's fake-quantized weight is. ``torch.mm``, not
    ``@``: the operator goes through Tensor.__matmul__'s Python wrapper and matmul's shape logic first."""
    return torch.mm(grad_y, dequantize_int8(w_codes, w_scale, grad_y.dtype))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Dtype of the GEMM outputs and of the backward GEMMs: autocast's where it is on (as for ``F.linear``, so a model
    with fp32 master weights under bf16 autocast runs its backward on bf16 tensor cores, not fp32 ones), else x's.
    Quantization reads x in its own dtype either way, as the reference's fake quantization does."""
    device_type = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def bitlinear_forward_impl(x, bias, norm_weight, w_codes, w_scale, norm_eps: float, act_eps: float,
                           out_dtype: torch.dtype, quantized: tuple | None = None):
    """The forward on tensors alone (no autograd): -> (y [..., N], x's int8 codes [M, K], their fp32 scale [M],
    fp32 1/rms [M] or None without SubLN). ``quantized``: those three, already made (``ternarize_and_quantize``).
    Shared by the eager autograd Function and the custom op."""
    if quantized is None:
        quantized = quantize_input(as_rows(x), norm_weight, norm_eps, act_eps)
    codes, a_scale, rstd = quantized
    y = int8_matmul(codes, w_codes, a_scale, w_scale, bias, out_dtype=out_dtype)
    if x.dim() != 2:  # a reshape, even a no-op one, costs ~10 us of host time on the H100 host
        y = y.reshape(*x.shape[:-1], w_codes.shape[0])
    return y, codes, a_scale, rstd


def bitlinear_backward_impl(grad_y, x, codes, a_scale, rstd, w_codes, w_scale, norm_weight, norm_eps: float,
                            act_eps: float, x_dtype: torch.dtype, weight_dtype: torch.dtype,
                            bias_dtype: torch.dtype, grad_input: bool, grad_weight: bool, grad_bias: bool):
    """The backward on tensors alone: -> (grad_x [M, K], grad_W, grad_bias, grad_norm_weight), None where not asked
    for (``grad_input`` asks for x's and the norm weight's). Saved state: ``x`` and the forward's ``rstd`` (SubLN
    with save_input: the codes are rebuilt from them bit for bit) or else ``codes``, ``a_scale`` and (SubLN)
    ``rstd``. Shared as the forward is."""
    g2 = grad_y if grad_y.dim() == 2 else grad_y.reshape(-1, w_codes.shape[0])
    if g2.stride(-1) != 1:
        g2 = g2.contiguous()
    if x is not None:
        if rstd is None or rstd.numel() != x.numel() // max(x.shape[-1], 1):
            got = None if rstd is None else tuple(rstd.shape)
            raise ValueError(f"a backward from the saved input x needs the forward's 1/rms (rstd), one per row; "
                             f"got {got} for x {tuple(x.shape)}")
        x = as_rows(x)
    grad_x = grad_w = grad_b = grad_nw = x_deq = None
    if grad_input:
        grad_h = bitlinear_grad_input(g2, w_codes, w_scale)  # d loss / d (quantized) normalized input, STE
        if norm_weight is None:
            grad_x = grad_h.to(x_dtype)
        else:
            source, code_scale = (x, None) if x is not None else (codes, a_scale)
            if grad_weight:  # the same pass over x (or its codes) writes the weight GEMM's dequantized operand
                grad_x, grad_nw, x_deq = rmsnorm_backward_and_dequantize(grad_h, source, norm_weight, rstd, act_eps,
                                                                         g2.dtype, code_scale, x_dtype)
            else:
                grad_x, grad_nw = rmsnorm_backward(grad_h, source, norm_weight, rstd, code_scale, x_dtype)
        del grad_h
    if grad_weight:
        if x_deq is None and x is not None:
            # Only W's gradient asked (x and the norm weight frozen: rare). The same pass with a zero upstream
            # gradient rebuilds the codes from the forward's own 1/rms: bit for bit, where re-running the forward's
            # pass would recompute 1/rms, on a GPU possibly an ulp apart.
            x_deq = rmsnorm_backward_and_dequantize(torch.zeros_like(x), x, norm_weight, rstd, act_eps, g2.dtype)[2]
        elif x_deq is None:
            x_deq = dequantize_int8(codes, a_scale, g2.dtype)
        grad_w = bitlinear_grad_weight(g2, x_deq, weight_dtype)
    if grad_bias:
        grad_b = g2.sum(0, dtype=torch.float32).to(bias_dtype)
    return grad_x, grad_w, grad_b, grad_nw


def keeps_input(norm_weight, save_input: bool) -> bool:
    """Whether the backward keeps x (SubLN with save_input: exact grads) rather than x's int8 codes."""
    return save_input and norm_weight is not None


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
    goes through the custom ops of ``bitlinear_library`` instead, which run the same two functions above. Its inputs
    are the four tensors that take gradients, the rest rides in one ``settings`` tuple: each argument of ``apply``
    and each saved slot costs host time (~3.5 us a call on the dev CPU for the ten arguments and seven slots this
    had). The weight codes are still saved through ``save_for_backward``, so saved-tensor hooks (offloading,
    checkpointing) see them as before."""

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
    key, hit = _cache_lookup(weight, per_channel, weight_eps, weight_cache)
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
        weight_cache["entry"] = (key, w_codes, w_scale)
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


from . import bitlinear_library as _library  # noqa: E402  (registers torch.ops.bitkernels.*; imports the above)

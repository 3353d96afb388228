"""BitLinear forward + backward on int8 tensor cores, saving int8 codes instead of the bf16 input.

Forward:  (SubLN RMSNorm +) per-token int8 quantization of x in one pass (``rmsnorm_quant`` / ``act_quant``), then
          ``int8_matmul`` with the two scales and the bias in its epilogue. The ternary weight codes come from
          ``ternarize_cached``: computed once per weight version, not once per call.
Backward: straight-through estimator. grad_h = grad_y @ (Wq*s) and grad_W = grad_y^T @ (xq*a/127) on cuBLAS, each
          over a dequantized copy of the codes made right before it and freed right after (``dequantize_int8``; with
          SubLN and ``save_input`` the re-quantizing pass writes xq*a/127 directly); then the SubLN RMSNorm backward.
Saved:    without SubLN: the int8 activation codes + fp32 per-token scale (1 byte per element; plain nn.Linear
          keeps the bf16 input, 2). With SubLN the RMSNorm backward needs x*rstd, two choices:
          ``save_input=True`` (the default of BitLinear and of ``bitlinear``): keep x only (2 bytes per element,
          half of plain RMSNorm+Linear's x and normalized x) and rebuild the codes in the backward with one more
          SubLN+quant pass: the reference's exact gradients.
          ``save_input=False``: keep the codes only (1 byte per element) and rebuild x*rstd as codes*scale / norm_weight
          (the quantized value, as the straight-through estimator already treats it): x's and the norm weight's
          gradients then carry the int8 rounding (|error| <= absmax/254 per element before the division by the norm
          weight; ~2e-3 relative L2 on dx in the tests), and elements whose norm weight is exactly 0 get none.
"""
from __future__ import annotations

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..reference.bitlinear import bitlinear_grad_weight  # a plain cuBLAS GEMM: the reference is the op
from ..reference.quantization import ACT_EPS, WEIGHT_EPS
from ._common import as_rows, row_block
from .act_quant import quantize_activations_int8
from .dequantize import dequantize_int8
from .int8_matmul import int8_matmul
from .rmsnorm_quant import rmsnorm_backward, rmsnorm_quantize_int8_forward
from .ternarize import ternarize_absmean


# Fused optimizers (``torch.optim.AdamW(fused=True)``, the "adamw_torch_fused" default of recent HF Trainers) write
# the parameters without bumping their version counters, so the version alone would keep stale codes after a step.
# Every torch.optim step (fused or not, wrapped by accelerate or not) bumps this count instead.
_optimizer_steps = 0


def _count_optimizer_step(optimizer, args, kwargs):
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def ternarize_cached(weight: torch.Tensor, per_channel: bool = False, eps: float = WEIGHT_EPS,
                     cache: dict | None = None):
    """``ternarize_absmean(weight)``, reused while the weight is unchanged.

    The key is the count of torch.optim steps taken in this process, the parameter's version counter (bumped by
    in-place updates: ``load_state_dict``, ``copy_`` under ``no_grad``), its storage, device, dtype and shape, and the
    quantization settings: eval passes and gradient-accumulation micro-steps reuse the codes. Writes through
    ``weight.data`` and optimizers outside torch.optim bypass both counters; call ``cache.clear()`` after those.
    """
    if cache is None:
        return ternarize_absmean(weight, per_channel, eps)
    key = (_optimizer_steps, weight._version, weight.data_ptr(), weight.device, weight.dtype, tuple(weight.shape),
           per_channel, eps)
    hit = cache.get("entry")
    if hit is not None and hit[0] == key:
        return hit[1], hit[2]
    codes, scale = ternarize_absmean(weight, per_channel, eps)
    cache["entry"] = (key, codes, scale)
    return codes, scale


def quantize_input(x2: torch.Tensor, norm_weight: torch.Tensor | None, norm_eps: float, act_eps: float):
    """Rows [M, K] -> (int8 codes, fp32 per-token scale, fp32 1/rms or None): SubLN fused with the quantization."""
    if norm_weight is None:
        codes, scale = quantize_activations_int8(x2, act_eps)
        return codes, scale, None
    return rmsnorm_quantize_int8_forward(x2, norm_weight, norm_eps, act_eps)


def bitlinear_grad_input(grad_y: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """grad_x [M, K] = grad_y [M, N] @ (Wq * s), Wq int8 [N, K], s per tensor [] or per output channel [N]; the
    dequantized weight is rounded to grad_y's dtype, as the reference's fake-quantized weight is."""
    return grad_y @ dequantize_int8(w_codes, w_scale, grad_y.dtype)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Dtype of the GEMM outputs and of the backward GEMMs: autocast's where it is on (as for ``F.linear``, so a model
    with fp32 master weights under bf16 autocast runs its backward on bf16 tensor cores, not fp32 ones), else x's.
    Quantization reads x in its own dtype either way, as the reference's fake quantization does."""
    device_type = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class BitLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, norm_weight, w_codes, w_scale, norm_eps, act_eps, save_input, out_dtype):
        if norm_weight is not None:
            row_block(x.shape[-1])  # the RMSNorm backward keeps rows in registers: refuse too-long rows up front
        x2 = as_rows(x)
        codes, a_scale, rstd = quantize_input(x2, norm_weight, norm_eps, act_eps)
        y = int8_matmul(codes, w_codes, a_scale, w_scale, bias, out_dtype=out_dtype)
        if save_input and norm_weight is not None:  # exact SubLN grads: keep x (bf16), rebuild the codes in backward
            ctx.save_for_backward(None, None, w_codes, w_scale, norm_weight, None, x2)
        else:
            ctx.save_for_backward(codes, a_scale, w_codes, w_scale, norm_weight, rstd, None)
        ctx.norm_eps, ctx.act_eps = norm_eps, act_eps
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.reshape(*x.shape[:-1], w_codes.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        codes, a_scale, w_codes, w_scale, norm_weight, rstd, x2 = ctx.saved_tensors
        if x2 is not None:  # one memory-bound pass over x instead of keeping x and its codes both alive
            x_deq, _, rstd = rmsnorm_quantize_int8_forward(x2, norm_weight, ctx.norm_eps, ctx.act_eps, dequantize=True,
                                                           out_dtype=grad_y.dtype)
        else:
            x_deq = None
        n = w_codes.shape[0]
        g2 = grad_y.reshape(-1, n)
        if g2.stride(-1) != 1:
            g2 = g2.contiguous()
        grad_x = grad_w = grad_b = grad_nw = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[3]:
            grad_h = bitlinear_grad_input(g2, w_codes, w_scale)  # d loss / d (quantized) normalized input, STE
            if norm_weight is None:
                grad_x = grad_h.to(ctx.x_dtype)
            elif x2 is not None:
                grad_x, grad_nw = rmsnorm_backward(grad_h, x2, norm_weight, rstd)
            else:
                grad_x, grad_nw = rmsnorm_backward(grad_h, codes, norm_weight, rstd, a_scale, ctx.x_dtype)
            grad_x = grad_x.reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            if x_deq is None:
                x_deq = dequantize_int8(codes, a_scale, g2.dtype)
            grad_w = bitlinear_grad_weight(g2, x_deq, ctx.weight_dtype)
        if ctx.needs_input_grad[2]:
            grad_b = g2.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, grad_nw, None, None, None, None, None, None


def bitlinear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
              norm_weight: torch.Tensor | None = None, norm_eps: float = 1e-6, per_channel: bool = False, *,
              act_eps: float = ACT_EPS, weight_eps: float = WEIGHT_EPS, weight_cache: dict | None = None,
              save_input: bool = True) -> torch.Tensor:
    """BitLinear on int8 tensor cores; same value as ``reference.bitlinear`` up to its bf16 matmul rounding (ours
    accumulates exactly in int32 and rounds once). See the module docstring for what is saved for backward."""
    w_codes, w_scale = ternarize_cached(weight, per_channel, weight_eps, weight_cache)
    return BitLinearFunction.apply(x, weight, bias, norm_weight, w_codes, w_scale, norm_eps, act_eps, save_input,
                                   compute_dtype(x))


def bitlinear_inference(x: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor,
                        bias: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
                        norm_eps: float = 1e-6, act_eps: float = ACT_EPS) -> torch.Tensor:
    """Forward only, from frozen int8 weight codes [N, K] and their scale ([] or [N]); no master weight."""
    x2 = as_rows(x.detach())
    codes, a_scale, _ = quantize_input(x2, None if norm_weight is None else norm_weight.detach(), norm_eps, act_eps)
    y = int8_matmul(codes, w_codes, a_scale, w_scale, None if bias is None else bias.detach(),
                    out_dtype=compute_dtype(x))
    return y.reshape(*x.shape[:-1], w_codes.shape[0])

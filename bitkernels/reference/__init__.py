"""Pure-PyTorch reference of every bitkernels op, name for name with ``bitkernels.ops``."""
from .attention_relation import attention_relation_distill_loss, attention_relation_kl
from .distill_loss import distill_kl, fused_linear_distill_loss
from .bitlinear import bitlinear_grad_input, bitlinear_grad_weight, bitlinear_inference, int8_matmul
from .quantization import (
    absmean_scale,
    bitlinear,
    dequantize_int8,
    fake_quantize_activations,
    fake_quantize_weight,
    quantize_activations_int8,
    rmsnorm,
    rmsnorm_fake_quantize,
    rmsnorm_quantize_int8,
    ternarize_absmean,
    ternarize_and_quantize,
    ternarize_with_scale,
)

__all__ = [
    "distill_kl",
    "fused_linear_distill_loss",
    "attention_relation_distill_loss",
    "attention_relation_kl",
    "bitlinear_grad_input",
    "bitlinear_grad_weight",
    "bitlinear_inference",
    "int8_matmul",
    "absmean_scale",
    "bitlinear",
    "dequantize_int8",
    "fake_quantize_activations",
    "fake_quantize_weight",
    "quantize_activations_int8",
    "rmsnorm",
    "rmsnorm_fake_quantize",
    "rmsnorm_quantize_int8",
    "ternarize_absmean",
    "ternarize_and_quantize",
    "ternarize_with_scale",
]

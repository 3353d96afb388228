"""Functional API: checks the inputs, then runs the Triton op or its PyTorch reference (see ``bitkernels.backend``).

Every function here has a twin of the same name in ``bitkernels.ops`` (Triton) and ``bitkernels.reference``.
"""
from .attention_relation import attention_relation_distill_loss, attention_relation_kl
from .distill_loss import distill_kl, fused_linear_distill_loss
from .bitlinear import bitlinear, bitlinear_inference
from .quantization import (
    fake_quantize_activations,
    fake_quantize_weight,
    quantize_activations_int8,
    rmsnorm_fake_quantize,
    rmsnorm_quantize_int8,
    ternarize_absmean,
)

__all__ = [
    "distill_kl",
    "fused_linear_distill_loss",
    "attention_relation_distill_loss",
    "attention_relation_kl",
    "bitlinear",
    "bitlinear_inference",
    "fake_quantize_activations",
    "fake_quantize_weight",
    "quantize_activations_int8",
    "rmsnorm_fake_quantize",
    "rmsnorm_quantize_int8",
    "ternarize_absmean",
]

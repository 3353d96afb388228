"""Functional API: checks the inputs, then runs the Triton op or its PyTorch reference (see ``bitkernels.backend``).

Every function here has a twin of the same name in ``bitkernels.ops`` (Triton) and ``bitkernels.reference``.
"""
from .bitlinear import bitlinear
from .quantization import (
    fake_quantize_activations,
    fake_quantize_weight,
    quantize_activations_int8,
    rmsnorm_fake_quantize,
    rmsnorm_quantize_int8,
    ternarize_absmean,
)

__all__ = [
    "bitlinear",
    "fake_quantize_activations",
    "fake_quantize_weight",
    "quantize_activations_int8",
    "rmsnorm_fake_quantize",
    "rmsnorm_quantize_int8",
    "ternarize_absmean",
]

"""Pure-PyTorch reference of every bitkernels op, name for name with ``bitkernels.ops``."""
from .quantization import (
    absmean_scale,
    bitlinear,
    fake_quantize_activations,
    fake_quantize_weight,
    quantize_activations_int8,
    rmsnorm,
    rmsnorm_fake_quantize,
    rmsnorm_quantize_int8,
    ternarize_absmean,
    ternarize_with_scale,
)

__all__ = [
    "absmean_scale",
    "bitlinear",
    "fake_quantize_activations",
    "fake_quantize_weight",
    "quantize_activations_int8",
    "rmsnorm",
    "rmsnorm_fake_quantize",
    "rmsnorm_quantize_int8",
    "ternarize_absmean",
    "ternarize_with_scale",
]

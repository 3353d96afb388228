"""bitkernels: Triton kernels for BitNet b1.58 (ternary weights, int8 activations) and BitNet Distillation.

Layers: ``ops`` (Triton kernels + autograd Functions) -> ``functional`` (checked API, backend choice) ->
``modules`` (BitLinear). ``reference`` is the pure-PyTorch twin of every op.
"""
from . import functional, reference
from .backend import use_triton
from .functional import (
    attention_relation_distill_loss,
    attention_relation_kl,
    bitlinear,
    fake_quantize_activations,
    fake_quantize_weight,
    quantize_activations_int8,
    rmsnorm_fake_quantize,
    rmsnorm_quantize_int8,
    ternarize_absmean,
)
from .functional import distill_kl, fused_linear_distill_loss
from .modules import BitLinear, SubLN, replace_linear

__all__ = [
    "distill_kl",
    "fused_linear_distill_loss",
    "attention_relation_distill_loss",
    "attention_relation_kl",
    "BitLinear",
    "SubLN",
    "bitlinear",
    "fake_quantize_activations",
    "fake_quantize_weight",
    "functional",
    "quantize_activations_int8",
    "reference",
    "replace_linear",
    "rmsnorm_fake_quantize",
    "rmsnorm_quantize_int8",
    "ternarize_absmean",
    "use_triton",
]

__version__ = "0.1.0"

"""Triton ops: each module holds its kernels, their launchers and autograd Functions, named as in
``bitkernels.reference``. Importing this package needs Triton."""
from .act_quant import fake_quantize_activations, quantize_activations_int8
from .rmsnorm_quant import rmsnorm_backward, rmsnorm_fake_quantize, rmsnorm_quantize_int8, rmsnorm_quantize_int8_forward
from .ternarize import fake_quantize_weight, ternarize_absmean

"""Triton ops: each module holds its kernels, their launchers and autograd Functions, named as in
``bitkernels.reference``. Importing this package needs Triton."""
from .attention_relation import attention_relation_distill_loss, attention_relation_kl
from .distill_loss import distill_kl, fused_linear_distill_loss
from .bitlinear import bitlinear, bitlinear_inference
from .bitlinear_impl import bitlinear_grad_input, bitlinear_grad_weight
from .dequantize import dequantize_int8
from .int8_matmul import int8_matmul
from .act_quant import fake_quantize_activations, quantize_activations_int8
from .rmsnorm_quant import (rmsnorm_backward, rmsnorm_backward_and_absmax, rmsnorm_backward_and_dequantize,
                            rmsnorm_dequantize_columns, rmsnorm_fake_quantize, rmsnorm_quantize_int8,
                            rmsnorm_quantize_int8_forward)
from .ternarize import fake_quantize_weight, ternarize_absmean
from .ternarize_and_quantize import ternarize_and_quantize

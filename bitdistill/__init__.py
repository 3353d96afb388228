"""bitdistill: BitNet Distillation pipeline (convert -> continued pre-training -> distillation) on HF causal LMs.

``convert`` turns a full-precision model into a BitNet b1.58 student; ``train`` runs the stages
(``accelerate launch bitdistill/train.py --config bitdistill/configs/tiny.yaml``).
"""
from .convert import convert_to_bitnet, load_student

__all__ = ["convert_to_bitnet", "load_student"]

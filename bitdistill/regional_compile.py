"""Regional torch.compile: each decoder layer compiled in place, the rest of the model eager.

Identical layers share one compiled graph (compiled once, not 28 times), the embedding / lm_head / loss code stays
eager, and ``nn.Module.compile`` keeps the module tree, parameter names and state_dict: checkpoints and
``save_pretrained`` see the same model. With ``mode="reduce-overhead"`` each layer's forward and backward replay as
CUDA graphs: the step stops paying Python and launch costs per kernel, which is what bounds a BitLinear model at a
few thousand tokens a step (bench/notes/pipeline.md). The layer whose q/k/v the attention-relation loss captures
with forward hooks stays eager: hooks added and removed every step would invalidate a compiled layer's guards.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .hf_layout import find_decoder_layers

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_compile_mode(mode: str | None) -> str | None:
    if mode in (None, False, "none", "off"):
        return None
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be null or one of {COMPILE_MODES} (torch.compile modes), got {mode!r}")
    return mode


def uses_cuda_graphs(mode: str | None) -> bool:
    return mode in ("reduce-overhead", "max-autotune")


def compile_decoder_layers(model: nn.Module, mode: str | None, skip: tuple[int, ...] = (),
                           backend: str = "inductor") -> list[int]:
    """Compile every decoder layer of ``model`` in place with ``torch.compile(mode=..., backend=...)``, except the
    layer indices in ``skip`` (negative counts from the end). Returns the compiled indices; ``mode=None`` compiles
    nothing."""
    mode = check_compile_mode(mode)
    if mode is None:
        return []
    _, layers = find_decoder_layers(model)
    skipped = {i % len(layers) for i in skip}
    done = []
    for i, layer in enumerate(layers):
        if i not in skipped:
            layer.compile(mode=None if mode == "default" else mode, backend=backend)
            done.append(i)
    return done


def mark_step_begin(mode: str | None) -> None:
    """Tell CUDA-graph trees a new training step starts: the previous step's graph outputs may be overwritten."""
    if uses_cuda_graphs(mode):
        torch.compiler.cudagraph_mark_step_begin()

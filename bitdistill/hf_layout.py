"""Where the decoder layers of a HF causal LM are, found by module structure rather than by model class.

Llama, Qwen2/2.5 and Qwen3 (and most HF decoders) keep their layers in an ``nn.ModuleList``, each layer with a
``self_attn`` and an ``mlp``. bitdistill (conversion, losses, regional compile) and cpu_ref (packed decoding) both
look for that list; they differ only in what a layer's projections may be, so that test is a parameter.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
LINEAR_LAYOUT = (f"an nn.ModuleList of layers, each with `self_attn` having Linear {', '.join(ATTENTION_PROJECTIONS)} "
                 "and `mlp` having Linear `down_proj` (Llama / Qwen2 / Qwen2.5 / Qwen3 layout)")


class UnsupportedModelError(ValueError):
    """The model's module tree is not the decoder layout this code understands."""


def has_linear_projections(layer: nn.Module) -> bool:
    """A full-precision decoder layer: ``self_attn`` with nn.Linear q/k/v/o and ``mlp`` with an nn.Linear
    ``down_proj`` (what conversion replaces)."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None:
        return False
    return (all(isinstance(getattr(attn, p, None), nn.Linear) for p in ATTENTION_PROJECTIONS)
            and isinstance(getattr(mlp, "down_proj", None), nn.Linear))


def has_attention_and_mlp(layer: nn.Module) -> bool:
    """Any decoder layer with ``self_attn`` and ``mlp``, whatever its projections are (packed modules included)."""
    return hasattr(layer, "self_attn") and hasattr(layer, "mlp")


def find_decoder_layers(model: nn.Module, is_layer: Callable[[nn.Module], bool] = has_linear_projections,
                        expected: str = LINEAR_LAYOUT) -> tuple[str, nn.ModuleList]:
    """The (qualified name, ModuleList) of the decoder layers: the first non-empty ModuleList whose every entry
    passes ``is_layer``. Raises UnsupportedModelError (naming ``expected`` and the lists seen) if there is none."""
    seen = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        seen.append(name)
        if all(is_layer(layer) for layer in module):
            return name, module
    raise UnsupportedModelError(
        f"{type(model).__name__}: found no decoder layers to convert. Expected {expected}. "
        f"ModuleLists found: {seen or 'none'}.")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The full-precision (or converted-from) decoder layers of ``model``; UnsupportedModelError if none."""
    return find_decoder_layers(model)[1]


def any_decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The first ModuleList whose entries all have ``self_attn`` and ``mlp`` (any projection modules), or None."""
    try:
        return find_decoder_layers(model, has_attention_and_mlp, "layers with `self_attn` and `mlp`")[1]
    except UnsupportedModelError:
        return None

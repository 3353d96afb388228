"""Full-precision HF causal LM -> BitNet b1.58 student (BitDistill Stage 1), and loading it back.

Conversion works on module structure, not on one model class's source. It expects what Llama, Qwen2/2.5 and Qwen3
(and most HF decoders) have: an ``nn.ModuleList`` of decoder layers, each with ``self_attn`` holding
``q_proj``/``k_proj``/``v_proj``/``o_proj`` and ``mlp`` holding ``down_proj`` (plus ``gate_proj``/``up_proj``).
Every ``nn.Linear`` inside the decoder layers becomes a ``bitkernels.BitLinear`` that shares the FP parameters; the
ones before which BitDistill inserts a SubLN (``o_proj`` and ``down_proj``) get ``BitLinear(subln=True)``, whose
RMSNorm weight (key ``<proj>.subln.weight``) starts at ones. Embeddings, final norm and ``lm_head`` stay FP.

The conversion is recorded in ``model.config.bitdistill`` so that :func:`load_student` rebuilds the same module tree
before loading the weights (a plain ``from_pretrained`` would drop the SubLN weights and run the layers in FP).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from bitkernels import BitLinear, replace_linear

# UnsupportedModelError and ATTENTION_PROJECTIONS stay importable from here (they lived here first)
from .hf_layout import ATTENTION_PROJECTIONS, UnsupportedModelError, find_decoder_layers  # noqa: F401

CONVERSION_KEY = "bitdistill"
CONVERSION_VERSION = 1
SUBLN_PROJECTIONS = ("o_proj", "down_proj")
SUBLN_LAYOUTS = ("subln", "allnorm")


def conversion_record(model: nn.Module) -> dict | None:
    """The conversion settings stored in the config, or None for a full-precision model."""
    config = getattr(model, "config", None)
    return getattr(config, CONVERSION_KEY, None) if config is not None else None


def convert_to_bitnet(model: nn.Module, subln: bool = True, quantize: bool = True, per_channel: bool = False,
                      subln_eps: float | None = None, backend: str | None = None, layout: str = "subln") -> nn.Module:
    """Convert ``model`` in place (and return it): decoder-layer linears -> BitLinear sharing the FP weights.

    subln: insert RMSNorms (fused into BitLinear) where ``layout`` says: "subln" before ``o_proj`` and
    ``down_proj`` (the paper), or "allnorm" before every projection of the block (the authors' shipped configs,
    their BitLinear's ``should_rms``; eps 1e-8 there, so that is this layout's default ``subln_eps``).
    quantize: False keeps the float matmul (with SubLN if asked), for checks against the FP model.
    per_channel: one absmean scale per output row instead of one per matrix (the paper uses per tensor).
    subln_eps: the RMSNorm epsilon; default the model's ``rms_norm_eps`` (else 1e-6).
    backend: BitLinear kernels: None/"auto" (Triton on CUDA), "triton" or "torch" (reference).
    """
    if bitlinear_names(model):
        raise ValueError(f"{type(model).__name__} already has BitLinear layers ({bitlinear_names(model)[0]}, ...); "
                         "convert a full-precision model")
    if layout not in SUBLN_LAYOUTS:
        raise ValueError(f"convert.layout must be one of {SUBLN_LAYOUTS}, got {layout!r}")
    config = getattr(model, "config", None)
    if subln_eps is None:
        subln_eps = 1e-8 if layout == "allnorm" else float(getattr(config, "rms_norm_eps", 1e-6) or 1e-6)
    layers_name, layers = find_decoder_layers(model)
    common = dict(quantize=quantize, per_channel=per_channel, backend=backend)
    converted = []
    for i, layer in enumerate(layers):
        if subln:  # first the normed projections, then every other Linear of the layer
            normed = [(parent, name) for parent, name in _block_linears(layer)
                      if layout == "allnorm" or name in SUBLN_PROJECTIONS]
            for parent, proj in normed:
                setattr(parent, proj, BitLinear.from_linear(getattr(parent, proj), subln=True, subln_eps=subln_eps,
                                                            **common))
        converted += [f"{layers_name}.{i}.{n}" for n in replace_linear(layer, **common)]
    if config is not None:
        setattr(config, CONVERSION_KEY, {"version": CONVERSION_VERSION, "subln": bool(subln),
                                         "quantize": bool(quantize), "per_channel": bool(per_channel),
                                         "subln_eps": subln_eps, "layout": layout})
    return model


def _block_linears(layer: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every nn.Linear directly inside the layer's ``self_attn`` and ``mlp``."""
    return [(parent, name) for parent in (layer.self_attn, layer.mlp)
            for name, child in parent.named_children() if isinstance(child, nn.Linear)]


def set_backend(model: nn.Module, backend: str | None) -> None:
    """Point every BitLinear of ``model`` at ``backend`` (None/"auto", "triton", "torch")."""
    for m in model.modules():
        if isinstance(m, BitLinear):
            m.backend = backend


def bitlinear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, BitLinear)]


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(str(path / shard)))
        return state
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json "
                            "(save the student with save_pretrained(..., safe_serialization=True))")


def load_student(path: str | os.PathLike, backend: str | None = None, dtype: torch.dtype | None = None,
                 device: str | torch.device | None = None) -> nn.Module:
    """Load a converted student saved with ``save_pretrained``: rebuild the architecture from its config, re-apply
    the recorded conversion, then load every weight (strictly: a missing or unexpected key is an error).
    A directory without a conversion record loads as the plain FP model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {str(path)!r} does not exist")
    config = AutoConfig.from_pretrained(str(path))
    record = getattr(config, CONVERSION_KEY, None)
    if record is None:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or "auto").to(device or "cpu")
    if record.get("version", 0) > CONVERSION_VERSION:
        raise ValueError(f"{path}: conversion record version {record.get('version')} is newer than this "
                         f"bitdistill ({CONVERSION_VERSION}); upgrade bitdistill")
    delattr(config, CONVERSION_KEY)
    saved_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(saved_dtype, str):
        saved_dtype = getattr(torch, saved_dtype)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype or saved_dtype or torch.float32)
    convert_to_bitnet(model, subln=record["subln"], quantize=record["quantize"], per_channel=record["per_channel"],
                      subln_eps=record["subln_eps"], backend=backend, layout=record.get("layout", "subln"))
    state = _read_state_dict(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set()
    if getattr(config, "tie_word_embeddings", False):
        tied = {n for n in missing if n.endswith("lm_head.weight")}
    missing = [n for n in missing if n not in tied]
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the converted architecture: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    if tied:
        model.tie_weights()
    if dtype is not None:
        model.to(dtype)
    return model.to(device or "cpu").eval()

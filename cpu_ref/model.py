"""Packed students: swap every BitLinear of an HF model for a PackedBitLinear that runs the CPU kernel, and save /
load that model as one safetensors file next to the HF config and tokenizer.

On-disk layout of a packed directory (``save_packed``):

    config.json, generation_config.json     the student's HF config (with its ``bitdistill`` conversion record)
    tokenizer files                         copied from the student directory when given
    cpu_ref.safetensors                     every tensor of the model, once (tied weights stored once):
        <linear>.qweight        uint8 [N, K_pad/4] (i2) or [N, ceil(K/5)] (tq1), see cpu_ref/packing.py
        <linear>.weight_scale   float32 [] (per tensor) or [N] (per row): W ~= codes * weight_scale
        <linear>.bias           float32 [N], if the linear has one
        <linear>.subln.weight   float32 [K], the SubLN RMSNorm before o_proj / down_proj
        every other parameter   (embeddings, norms, lm_head if untied) in ``float_dtype``
      header metadata (strings): format = "bitkernels.cpu_ref", format_version = "1", packing = "i2" | "tq1",
        float_dtype, linears = JSON {name: {in_features, out_features, bias, subln, subln_eps, per_channel,
        crc32 (of the qweight bytes)}}

Loading checks the format, every shape, every code value and every crc32, and says which tensor is wrong.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitkernels.modules import BitLinear
from bitkernels.reference import rmsnorm, ternarize_absmean

from . import ops
from .packing import PACKINGS, PackingError, i2_padded_k, pack, pack_i2, packed_shape, unpack

FORMAT = "bitkernels.cpu_ref"
FORMAT_VERSION = "1"
WEIGHTS_NAME = "cpu_ref.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja")


class PackedBitLinear(nn.Module):
    """Inference-only BitLinear on i2-packed ternary weights: (SubLN) -> int8 per token -> kernel -> scales."""

    def __init__(self, in_features: int, out_features: int, qweight: torch.Tensor, weight_scale: torch.Tensor,
                 bias: torch.Tensor | None = None, subln_weight: torch.Tensor | None = None, subln_eps: float = 1e-6,
                 n_threads: int | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if tuple(qweight.shape) != packed_shape("i2", out_features, in_features) or qweight.dtype != torch.uint8:
            raise PackingError(f"qweight must be i2-packed uint8 {packed_shape('i2', out_features, in_features)}, "
                               f"got {qweight.dtype} {tuple(qweight.shape)}")
        if weight_scale.numel() not in (1, out_features):
            raise PackingError(f"weight_scale must have 1 or {out_features} values, got {weight_scale.numel()}")
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("weight_scale", weight_scale.detach().float().reshape(-1).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        self.register_buffer("subln_weight", None if subln_weight is None else subln_weight.detach().float().contiguous())
        self.subln_eps = float(subln_eps)
        self.n_threads = n_threads

    @classmethod
    def from_bitlinear(cls, layer: BitLinear, n_threads: int | None = None) -> "PackedBitLinear":
        codes, scale = ternarize_absmean(layer.weight.detach(), per_channel=layer.per_channel)
        return cls(layer.in_features, layer.out_features, pack_i2(codes), scale, layer.bias,
                   None if layer.subln is None else layer.subln.weight, 1e-6 if layer.subln is None else layer.subln.eps,
                   n_threads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if self.subln_weight is not None:
            # The SubLN RMSNorm through the reference's own torch ops, bit for bit: the kernel's fused RMSNorm sums
            # in another order, and a last-bit difference can move an int8 code by one step.
            x = rmsnorm(x, self.subln_weight, self.subln_eps)
        return ops.bitlinear_packed(x, self.qweight, self.weight_scale, self.in_features, self.bias,
                                    n_threads=self.n_threads).to(dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"subln={self.subln_weight is not None}, weight_scale={'per_row' if self.weight_scale.numel() > 1 else 'per_tensor'}")


class Bf16Embedding(nn.Module):
    """Token embedding from a bf16 table (shared with a tied Bf16Head), returned in float32."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().to(torch.bfloat16).contiguous(), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).float()


class Bf16Head(nn.Module):
    """lm_head from bf16 weights with float32 products and sums: the cpu_ref kernel for a few rows (decode), torch's
    bf16 matmul for many (prefill). Halves the largest float weight stream of decode against fp32."""

    def __init__(self, weight: torch.Tensor, n_threads: int | None = None, max_kernel_rows: int = 8):
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) and weight.dtype == torch.bfloat16 else \
            nn.Parameter(weight.detach().to(torch.bfloat16).contiguous(), requires_grad=False)
        self.n_threads, self.max_kernel_rows = n_threads, max_kernel_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // x.shape[-1] <= self.max_kernel_rows:
            return ops.head_bf16(x, self.weight, self.n_threads)
        return F.linear(x.to(torch.bfloat16), self.weight).float()


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def pack_model(model: nn.Module, n_threads: int | None = None) -> list[str]:
    """In place: every BitLinear (with ``quantize=True``) -> PackedBitLinear. Returns the names swapped."""
    names = [n for n, m in model.named_modules() if isinstance(m, BitLinear)]
    if not names:
        raise ValueError("the model has no BitLinear layer: convert it first (bitdistill.convert.convert_to_bitnet) "
                         "or load a student with bitdistill.convert.load_student")
    for name in names:
        layer = model.get_submodule(name)
        if not layer.quantize:
            raise ValueError(f"{name} is a BitLinear with quantize=False: its float forward has no packed form")
        _set_module(model, name, PackedBitLinear.from_bitlinear(layer, n_threads))
    return names


def set_threads(model: nn.Module, n_threads: int | None) -> None:
    for m in model.modules():
        if isinstance(m, (PackedBitLinear, Bf16Head)):
            m.n_threads = n_threads


def save_packed(model: nn.Module, out_dir: str | os.PathLike, packing: str = "i2",
                float_dtype: torch.dtype = torch.float32, tokenizer_dir: str | os.PathLike | None = None,
                head_dtype: torch.dtype | None = None) -> pathlib.Path:
    """Write a packed directory (layout in this module's docstring) from a model holding BitLinear or
    PackedBitLinear layers (the model is not changed). ``head_dtype`` (default ``float_dtype``) is the dtype of the
    token embedding and lm_head tables, the largest float tensors."""
    from safetensors.torch import save_file

    if packing not in PACKINGS:
        raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors, linears, seen = {}, {}, {}
    for name, m in model.named_modules():
        if isinstance(m, BitLinear):
            m = PackedBitLinear.from_bitlinear(m)
        if not isinstance(m, PackedBitLinear):
            continue
        codes = unpack(m.qweight, m.in_features, "i2")
        q = pack(codes, packing)
        tensors[f"{name}.qweight"] = q
        tensors[f"{name}.weight_scale"] = m.weight_scale.reshape(()) if m.weight_scale.numel() == 1 else m.weight_scale
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias
        if m.subln_weight is not None:
            tensors[f"{name}.subln.weight"] = m.subln_weight
        linears[name] = {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None,
                         "subln": m.subln_weight is not None, "subln_eps": m.subln_eps,
                         "per_channel": m.weight_scale.numel() > 1, "crc32": zlib.crc32(q.numpy().tobytes())}
    if not linears:
        raise ValueError("the model has no BitLinear / PackedBitLinear layer to pack")
    prefixes = tuple(f"{n}." for n in linears)
    head_dtype = head_dtype or float_dtype
    tables = {_module_name(model, model.get_input_embeddings()), _module_name(model, model.get_output_embeddings())} \
        if hasattr(model, "get_input_embeddings") else set()
    tables = {f"{t}.weight" for t in tables if t is not None}
    for name, t in model.state_dict(keep_vars=True).items():  # persistent tensors only, tied ones under each name
        if name.startswith(prefixes) or name in tensors:
            continue
        key = (t.data_ptr(), tuple(t.shape))
        if key in seen:  # tied (lm_head = embed_tokens): stored once, re-tied at load
            continue
        seen[key] = name
        tensors[name] = t.detach().to(head_dtype if name in tables else float_dtype).contiguous()
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "packing": packing,
            "float_dtype": str(float_dtype).removeprefix("torch."), "head_dtype": str(head_dtype).removeprefix("torch."), "linears": json.dumps(linears)}
    save_file(tensors, str(out / WEIGHTS_NAME), metadata=meta)
    config = getattr(model, "config", None)
    if config is not None:
        config.save_pretrained(str(out))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(str(out))
    if tokenizer_dir is not None:
        for f in TOKENIZER_FILES:
            src = pathlib.Path(tokenizer_dir) / f
            if src.is_file():
                shutil.copy2(src, out / f)
    return out


def _module_name(model: nn.Module, module: nn.Module | None) -> str | None:
    for name, m in model.named_modules():
        if m is module:
            return name
    return None


def _read_packed(path: pathlib.Path):
    from safetensors import safe_open

    file = path / WEIGHTS_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME} (write one with cpu_ref.save_packed or "
                                "`python -m cpu_ref pack`)")
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for bad headers / short files
        raise PackingError(f"{file}: not a readable safetensors file ({type(exc).__name__}: {exc}); "
                           "the file is truncated or corrupt: re-create it with `python -m cpu_ref pack`") from exc
    if meta.get("format") != FORMAT:
        raise PackingError(f"{file}: metadata format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise PackingError(f"{file}: format_version {meta.get('format_version')!r} is not {FORMAT_VERSION!r}; "
                           "re-pack with this version of cpu_ref")
    if meta.get("packing") not in PACKINGS:
        raise PackingError(f"{file}: unknown packing {meta.get('packing')!r} (expected one of {PACKINGS})")
    try:
        linears = json.loads(meta["linears"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise PackingError(f"{file}: missing or unreadable 'linears' metadata ({exc})") from exc
    return meta, linears, tensors


def load_packed(path: str | os.PathLike, n_threads: int | None = None, float_dtype: torch.dtype = torch.float32,
                verify_crc: bool = True, head_dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild the HF model of a packed directory with PackedBitLinear layers (eval mode, CPU).

    ``float_dtype`` is the dtype of everything that is not packed (norms, attention math, and by default the
    embedding / lm_head): float32 reproduces the PyTorch student. ``head_dtype=torch.bfloat16`` keeps the embedding
    and lm_head tables in bf16 (Bf16Embedding / Bf16Head, float32 arithmetic): half the largest float weight
    stream of decode, for deployment; logits then differ from the student by bf16 rounding of those weights."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = pathlib.Path(path)
    meta, linears, tensors = _read_packed(path)
    packing = meta["packing"]
    config = AutoConfig.from_pretrained(str(path))
    if hasattr(config, "bitdistill"):
        delattr(config, "bitdistill")
    with init_empty_weights(include_buffers=False):  # parameters on meta: no float copy of the linears, ever
        model = AutoModelForCausalLM.from_config(config, dtype=float_dtype)
    for name, spec in linears.items():
        n, k = spec["out_features"], spec["in_features"]
        q = tensors.pop(f"{name}.qweight", None)
        scale = tensors.pop(f"{name}.weight_scale", None)
        if q is None or scale is None:
            raise PackingError(f"{path / WEIGHTS_NAME}: {name} lacks its qweight or weight_scale tensor")
        if tuple(q.shape) != packed_shape(packing, n, k) or q.dtype != torch.uint8:
            raise PackingError(f"{name}.qweight is {q.dtype} {tuple(q.shape)}, expected uint8 "
                               f"{packed_shape(packing, n, k)} for a {packing} [{n}, {k}] matrix (corrupt file?)")
        if verify_crc and zlib.crc32(q.numpy().tobytes()) != spec["crc32"]:
            raise PackingError(f"{name}.qweight fails its crc32 check: the file is corrupt, re-pack it")
        codes = unpack(q, k, packing)  # validates every code; tq1 is transcoded to the kernel's i2 here
        qi2 = q if packing == "i2" else pack_i2(codes)
        layer = PackedBitLinear(k, n, qi2, scale, tensors.pop(f"{name}.bias", None),
                                tensors.pop(f"{name}.subln.weight", None), spec["subln_eps"], n_threads)
        _set_module(model, name, layer)
    tables = {f"{_module_name(model, model.get_input_embeddings())}.weight",
              f"{_module_name(model, model.get_output_embeddings())}.weight"}
    state = {k: v.to(head_dtype if head_dtype is not None and k in tables else float_dtype) for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [m for m in missing if not m.endswith("lm_head.weight")]
    packed_keys = {f"{n}.{b}" for n in linears for b in ("qweight", "weight_scale", "bias", "subln_weight")}
    missing = [m for m in missing if m not in packed_keys]
    if missing or unexpected:
        raise PackingError(f"{path / WEIGHTS_NAME} does not match the model of its config.json: missing "
                           f"{missing[:8]}, unexpected {unexpected[:8]}")
    if head_dtype == torch.bfloat16:
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        new_emb = Bf16Embedding(emb.weight)
        tied = head is not None and head.weight is emb.weight
        new_head = Bf16Head(new_emb.weight if tied else head.weight, n_threads)
        _set_module(model, _module_name(model, emb), new_emb)
        _set_module(model, _module_name(model, head), new_head)
    elif head_dtype not in (None, float_dtype):
        raise ValueError(f"head_dtype must be None, the float_dtype or torch.bfloat16, got {head_dtype}")
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise PackingError(f"{path / WEIGHTS_NAME}: no weights for {still_meta[:8]}")
    return model.eval()


def linear_weight_bytes(model: nn.Module) -> dict:
    """Bytes of the linear layers that are packed: as stored (qweight + scales) and as fp16 / fp32."""
    packed = fp = 0
    for m in model.modules():
        if isinstance(m, PackedBitLinear):
            packed += m.qweight.numel() + 4 * m.weight_scale.numel()
            fp += m.in_features * m.out_features
    return {"i2": packed, "fp16": 2 * fp, "fp32": 4 * fp}


__all__ = ["Bf16Embedding", "Bf16Head", "PackedBitLinear", "pack_model", "save_packed", "load_packed", "set_threads", "linear_weight_bytes",
           "i2_padded_k"]

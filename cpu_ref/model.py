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
        <group>.qweight         q/k/v (<layer>.self_attn.qkv_proj) and gate/up (<layer>.mlp.gate_up_proj) codes
                                stored stacked, rows in that order (version 2): loaded as row views of one
                                tensor, the layout the fused kernel call wants, with no copy at load
        every other parameter   (embeddings, norms, lm_head if untied) in ``float_dtype``
      header metadata (strings): format = "bitkernels.cpu_ref", format_version = "2" ("1": nothing stacked, still
        read), packing = "i2" | "tq1", float_dtype, linears = JSON {name: {in_features, out_features, bias, subln,
        subln_eps, per_channel, crc32 (of the linear's own qweight bytes), stacked (optional): {tensor, row}}}

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
from bitkernels.reference import ternarize_absmean

from . import ops
from .packing import PACKINGS, PackingError, i2_padded_k, pack, pack_i2, packed_shape, unpack

FORMAT = "bitkernels.cpu_ref"
FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", "2")
STACKED_GROUPS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
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
        self._prepared = None  # ops.PreparedBitLinear of the current buffers, built at the first call

    def __getstate__(self):  # copies and pickles rebuild the prepared call (it holds raw pointers)
        return {**super().__getstate__(), "_prepared": None}

    @classmethod
    def from_bitlinear(cls, layer: BitLinear, n_threads: int | None = None) -> "PackedBitLinear":
        codes, scale = ternarize_absmean(layer.weight.detach(), per_channel=layer.per_channel)
        return cls(layer.in_features, layer.out_features, pack_i2(codes), scale, layer.bias,
                   None if layer.subln is None else layer.subln.weight, 1e-6 if layer.subln is None else layer.subln.eps,
                   n_threads)

    def prepared(self) -> "ops.PreparedBitLinear":
        """The kernel call of the current buffers, (re)built whenever a buffer was replaced
        (load_state_dict(assign=True), .to(), fuse_projections)."""
        b = self._buffers  # direct dict access: nn.Module.__getattr__ is slow on the per-token path
        prep = self._prepared
        if prep is None or not prep.holds(b["qweight"], b["weight_scale"], b["bias"], b["subln_weight"]):
            prep = self._prepared = ops.PreparedBitLinear(b["qweight"], b["weight_scale"], self.in_features,
                                                          b["bias"], b["subln_weight"], self.subln_eps)
        return prep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x's last dimension ({x.shape[-1]}) must equal in_features={self.in_features}")
        prep = self.prepared()
        dtype = x.dtype
        x32 = x if dtype is torch.float32 and x.is_contiguous() else x.to(torch.float32).contiguous()
        # SubLN: the mean square through torch's own ops, exactly as bitkernels.reference.rmsnorm computes it (a C
        # sum in another order could move an int8 code by one step); the rest of the RMSNorm (rsqrt, two
        # products: IEEE-exact elementwise) runs fused in the kernel.
        ms = x32.pow(2).mean(dim=-1, keepdim=True) if prep.subln else None
        y = prep(x32, ms, self.n_threads)
        return y if dtype is torch.float32 else y.to(dtype)

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


class KernelHead(nn.Module):
    """lm_head on a float32 or bf16 table with float32 products and sums: the cpu_ref head kernel (head.cpp, one
    sequential weight stream per thread) for a few rows (decode), torch's matmul for many (prefill; float32:
    ``F.linear`` exactly as nn.Linear, bf16: torch's bf16 matmul). Returns float32 logits."""

    def __init__(self, weight: torch.Tensor, n_threads: int | None = None, max_kernel_rows: int = 8):
        super().__init__()
        if weight.dtype not in (torch.float32, torch.bfloat16) or weight.dim() != 2:
            raise ValueError(f"KernelHead needs a 2-D float32 or bfloat16 weight, got {weight.dtype} "
                             f"{tuple(weight.shape)}")
        self.weight = weight if isinstance(weight, nn.Parameter) and weight.is_contiguous() else \
            nn.Parameter(weight.detach().contiguous(), requires_grad=False)
        self.n_threads, self.max_kernel_rows = n_threads, max_kernel_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // x.shape[-1] <= self.max_kernel_rows:
            return ops.head_gemv(x, self.weight, self.n_threads)
        if self.weight.dtype == torch.float32:
            return F.linear(x.float(), self.weight)
        return F.linear(x.to(torch.bfloat16), self.weight).float()


class Bf16Head(KernelHead):
    """KernelHead on the bf16 copy of ``weight`` (kept as is when it is already a bf16 Parameter)."""

    def __init__(self, weight: torch.Tensor, n_threads: int | None = None, max_kernel_rows: int = 8):
        if not (isinstance(weight, nn.Parameter) and weight.dtype == torch.bfloat16):
            weight = nn.Parameter(weight.detach().to(torch.bfloat16).contiguous(), requires_grad=False)
        super().__init__(weight, n_threads, max_kernel_rows)


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def pack_model(model: nn.Module, n_threads: int | None = None) -> list[str]:
    """In place: every BitLinear (with ``quantize=True``) -> PackedBitLinear, with the q/k/v and gate/up weights
    stacked (``cpu_ref.fuse.fuse_projections``). Returns the names swapped. The lm_head is left as it is."""
    names = [n for n, m in model.named_modules() if isinstance(m, BitLinear)]
    if not names:
        raise ValueError("the model has no BitLinear layer: convert it first (bitdistill.convert.convert_to_bitnet) "
                         "or load a student with bitdistill.convert.load_student")
    for name in names:
        layer = model.get_submodule(name)
        if not layer.quantize:
            raise ValueError(f"{name} is a BitLinear with quantize=False: its float forward has no packed form")
        _set_module(model, name, PackedBitLinear.from_bitlinear(layer, n_threads))
    from .fuse import fuse_projections

    fuse_projections(model)
    return names


def set_threads(model: nn.Module, n_threads: int | None) -> None:
    for m in model.modules():
        if isinstance(m, (PackedBitLinear, KernelHead)):
            m.n_threads = n_threads


def _stack_groups(tensors: dict, linears: dict) -> None:
    """In place: the q/k/v and gate/up codes of each layer as one stacked tensor (see the module docstring)."""
    for name in list(linears):
        parent, _, leaf = name.rpartition(".")
        for group, parts in STACKED_GROUPS.items():
            if leaf != parts[0]:
                continue
            names = [f"{parent}.{p}" if parent else p for p in parts]
            specs = [linears.get(n) for n in names]
            if any(sp is None or sp["subln"] or sp["in_features"] != specs[0]["in_features"] for sp in specs):
                continue
            key = f"{parent}.{group}.qweight" if parent else f"{group}.qweight"
            tensors[key] = torch.cat([tensors.pop(f"{n}.qweight") for n in names])
            row = 0
            for n, sp in zip(names, specs):
                sp["stacked"] = {"tensor": key, "row": row}
                row += sp["out_features"]


def save_packed(model: nn.Module, out_dir: str | os.PathLike, packing: str = "i2",
                float_dtype: torch.dtype = torch.float32, tokenizer_dir: str | os.PathLike | None = None,
                head_dtype: torch.dtype | None = None, stack_projections: bool = True) -> pathlib.Path:
    """Write a packed directory (layout in this module's docstring) from a model holding BitLinear or
    PackedBitLinear layers (the model is not changed). ``head_dtype`` (default ``float_dtype``) is the dtype of the
    token embedding and lm_head tables, the largest float tensors. ``stack_projections``: store q/k/v and gate/up
    stacked (False: one tensor per linear, as version 1 did)."""
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
                         "per_channel": m.weight_scale.numel() > 1, "crc32": zlib.crc32(q.numpy())}
    if not linears:
        raise ValueError("the model has no BitLinear / PackedBitLinear layer to pack")
    if stack_projections:
        _stack_groups(tensors, linears)
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
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise PackingError(f"{file}: format_version {meta.get('format_version')!r} is not one of "
                           f"{READABLE_VERSIONS}; re-pack with this version of cpu_ref")
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
    stream of decode, for deployment; logits then differ from the student by bf16 rounding of those weights.
    Either way the lm_head is a KernelHead (the head kernel at decode, torch's matmul for many rows), and the q/k/v
    and gate/up weights of each layer are stacked into one buffer (``cpu_ref.fuse``): one kernel call each."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    if head_dtype not in (None, float_dtype, torch.bfloat16):
        raise ValueError(f"head_dtype must be None, the float_dtype or torch.bfloat16, got {head_dtype}")
    path = pathlib.Path(path)
    meta, linears, tensors = _read_packed(path)
    packing = meta["packing"]
    config = AutoConfig.from_pretrained(str(path))
    if hasattr(config, "bitdistill"):
        delattr(config, "bitdistill")
    with init_empty_weights(include_buffers=False):  # parameters on meta: no float copy of the linears, ever
        model = AutoModelForCausalLM.from_config(config, dtype=float_dtype)
    stacked_keys = set()
    for name, spec in linears.items():
        n, k = spec["out_features"], spec["in_features"]
        if "stacked" in spec:  # rows [row, row + n) of a stacked tensor: a view, no copy
            key, row = spec["stacked"]["tensor"], spec["stacked"]["row"]
            big = tensors.get(key)
            if big is None or big.dim() != 2 or not 0 <= row <= row + n <= big.shape[0]:
                raise PackingError(f"{path / WEIGHTS_NAME}: {name} refers to rows {row}..{row + n} of {key!r}, "
                                   f"which the file lacks (corrupt file?)")
            q = big[row:row + n]
            stacked_keys.add(key)
        else:
            q = tensors.pop(f"{name}.qweight", None)
        scale = tensors.pop(f"{name}.weight_scale", None)
        if q is None or scale is None:
            raise PackingError(f"{path / WEIGHTS_NAME}: {name} lacks its qweight or weight_scale tensor")
        if tuple(q.shape) != packed_shape(packing, n, k) or q.dtype != torch.uint8:
            raise PackingError(f"{name}.qweight is {q.dtype} {tuple(q.shape)}, expected uint8 "
                               f"{packed_shape(packing, n, k)} for a {packing} [{n}, {k}] matrix (corrupt file?)")
        if verify_crc and zlib.crc32(q.numpy()) != spec["crc32"]:
            raise PackingError(f"{name}.qweight fails its crc32 check: the file is corrupt, re-pack it")
        codes = unpack(q, k, packing)  # validates every code; tq1 is transcoded to the kernel's i2 here
        qi2 = q if packing == "i2" else pack_i2(codes)
        layer = PackedBitLinear(k, n, qi2, scale, tensors.pop(f"{name}.bias", None),
                                tensors.pop(f"{name}.subln.weight", None), spec["subln_eps"], n_threads)
        _set_module(model, name, layer)
    for key in stacked_keys:
        del tensors[key]
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
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head_dtype == torch.bfloat16:
        new_emb = Bf16Embedding(emb.weight)
        tied = head is not None and head.weight is emb.weight
        new_head = Bf16Head(new_emb.weight if tied else head.weight, n_threads)
        _set_module(model, _module_name(model, emb), new_emb)
        _set_module(model, _module_name(model, head), new_head)
    elif head is not None and head.weight.dtype in (torch.float32, torch.bfloat16):
        # The same table (tied or not), run through the head kernel at decode.
        _set_module(model, _module_name(model, head), KernelHead(head.weight, n_threads))
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise PackingError(f"{path / WEIGHTS_NAME}: no weights for {still_meta[:8]}")
    from .fuse import fuse_projections

    fuse_projections(model)  # q/k/v and gate/up stacked: one kernel call each at decode
    return model.eval()


def linear_weight_bytes(model: nn.Module) -> dict:
    """Bytes of the linear layers that are packed: as stored (qweight + scales) and as fp16 / fp32."""
    packed = fp = 0
    for m in model.modules():
        if isinstance(m, PackedBitLinear):
            packed += m.qweight.numel() + 4 * m.weight_scale.numel()
            fp += m.in_features * m.out_features
    return {"i2": packed, "fp16": 2 * fp, "fp32": 4 * fp}


__all__ = ["Bf16Embedding", "Bf16Head", "KernelHead", "PackedBitLinear", "pack_model", "save_packed", "load_packed", "set_threads", "linear_weight_bytes",
           "i2_padded_k"]

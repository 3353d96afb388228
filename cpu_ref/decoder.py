"""The lean decode loop shared by every variant (packed and the torch baselines): Llama / Qwen2 / Qwen3-style
decoders with a static preallocated KV cache and a minimal per-layer forward.

Why: at batch 1 on many cores the HF eager forward costs more than the weights it reads (per token and layer:
mask building, DynamicCache concatenations, hooks, output records, ~50 small torch ops of a few microseconds each
whatever their size, three q/k/v and two gate/up products). This loop does the same arithmetic with far fewer calls:

- q/k/v and gate/up as one product each (``cpu_ref.fuse.FusedProduct``: one kernel call on stacked weights).
- KV cache: one [1, kv_heads, max_len, head_dim] buffer per layer and kind, written in place.
- One token (decode): the non-linear work runs as 4 C calls a layer (``layer_ops`` / layer.cpp: residual add +
  RMSNorm, q/k norm + RoPE + cache write + attention, SwiGLU) in the model's activation dtype with HF's rounding
  points; equal to the HF forward up to float32 summation order. Needs the AVX-512 or AVX2 build and sizes that are
  multiples of 16 (head_dim of 32); otherwise, and for a prompt (several tokens), the torch path below.
- Several tokens (prefill): torch ops in HF's own op sequence (RMSNorm, RoPE, SwiGLU; q_norm / k_norm and RoPE of
  q and k once on the adjacent q|k columns) and ``F.scaled_dot_product_attention`` (GQA via ``enable_gqa``),
  causal for a prompt.
- Only the last position goes through the final norm and the lm_head (greedy decoding needs nothing else).

The variants differ only in their modules: the linear layers, the embedding and the head are called as they are
(``PackedBitLinear`` with its SubLN, ``nn.Linear``, ``KernelHead``, ...). For a float32 packed model the one-token path
calls the products' prepared kernels directly (``_DirectProduct``: same kernels, same bits, no module machinery). ``unsupported_reason`` says why a model
cannot use this loop (other architectures, sliding-window layers, ...); ``runner`` then falls back to the HF forward.
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitdistill.hf_layout import UnsupportedModelError, any_decoder_layers

from . import _build
from .fuse import FusedProduct

MODEL_TYPES = ("llama", "qwen2", "qwen3")


def _is_rmsnorm(m) -> bool:
    return m is not None and type(m).__name__.endswith("RMSNorm") and hasattr(m, "weight") and \
        hasattr(m, "variance_epsilon")


def unsupported_reason(model: nn.Module) -> str | None:
    """None if ``LeanDecoder`` can run ``model``, else why not."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {MODEL_TYPES}"
    if getattr(config, "hidden_act", None) != "silu":
        return f"hidden_act {getattr(config, 'hidden_act', None)!r} is not 'silu'"
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or []):
        return "sliding-window attention layers"
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    for attr in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if getattr(base, attr, None) is None:
            return f"the base model has no {attr}"
    if not _is_rmsnorm(base.norm) or model.get_output_embeddings() is None:
        return "no RMSNorm final norm or no lm_head"
    if any_decoder_layers(model) is not base.layers:
        return "decoder layers not found"
    head_dim = getattr(base.layers[0].self_attn, "head_dim", None)
    with torch.no_grad():  # RoPE over the whole head (no partial rotary factor)
        cos, _ = base.rotary_emb(torch.zeros(1, 1, 1), torch.zeros(1, 1, dtype=torch.long))
    if cos.shape[-1] != head_dim:
        return f"rotary embedding over {cos.shape[-1]} of {head_dim} head dims"
    for layer in base.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")):
            return f"{type(attn).__name__} lacks q/k/v/o projections, head_dim or scaling"
        if not all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            return f"{type(mlp).__name__} is not a gate/up/down MLP"
        if not all(hasattr(m, "out_features") for m in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj,
                                                          mlp.up_proj)):
            return "projections without out_features"
        if not (_is_rmsnorm(layer.input_layernorm) and _is_rmsnorm(layer.post_attention_layernorm)):
            return "layer norms are not RMSNorm"
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        if (q_norm is None) != (k_norm is None) or (q_norm is not None and not (_is_rmsnorm(q_norm) and
                                                                               _is_rmsnorm(k_norm))):
            return "unknown q/k norm"
    return None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's Llama/Qwen RMSNorm, op for op: normalize in float32, round to the input dtype, then scale."""
    if x.dtype == torch.float32:
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    h = x.to(torch.float32)
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated, for ``rotate``."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """HF's apply_rotary_pos_emb for one tensor, x * cos + rotate_half(x) * sin, in 4 ops instead of 7:
    rotate_half(x) * sin = cat(-x2 * s1, x1 * s2) = roll(x, half) * cat(-s1, s2), bit for bit ((-a) b == a (-b))."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed


def _joined(outs: list[torch.Tensor]) -> torch.Tensor:
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


class _Layer:
    __slots__ = ("in_w", "in_eps", "post_w", "post_eps", "qkv", "qk_w", "qk_eps", "o_proj", "gate_up", "act",
                 "down", "hq", "hk", "d", "scaling", "inter", "q_norm_w", "k_norm_w", "desc", "desc_addr",
                 "qkv_sizes", "products")

    def __init__(self, layer: nn.Module):
        attn, mlp = layer.self_attn, layer.mlp
        pre, post = layer.input_layernorm, layer.post_attention_layernorm
        self.in_w, self.in_eps = pre.weight, pre.variance_epsilon
        self.post_w, self.post_eps = post.weight, post.variance_epsilon
        self.qkv = FusedProduct([attn.q_proj, attn.k_proj, attn.v_proj])
        self.d = attn.head_dim
        self.hq, self.hk = attn.q_proj.out_features // self.d, attn.k_proj.out_features // self.d
        self.scaling = attn.scaling
        self.qkv_sizes = (self.hq * self.d, self.hk * self.d, self.hk * self.d)
        self.qk_w = self.qk_eps = self.q_norm_w = self.k_norm_w = None
        if getattr(attn, "q_norm", None) is not None:
            if attn.q_norm.variance_epsilon != attn.k_norm.variance_epsilon:
                raise UnsupportedModelError("q_norm and k_norm with different eps")
            self.q_norm_w, self.k_norm_w = attn.q_norm.weight.detach(), attn.k_norm.weight.detach()
            # One norm over the q|k heads: per-head weights stacked [hq + hk, head_dim].
            self.qk_w = torch.cat([self.q_norm_w.expand(self.hq, self.d), self.k_norm_w.expand(self.hk, self.d)])
            self.qk_eps = attn.q_norm.variance_epsilon
        self.o_proj = attn.o_proj
        self.gate_up = FusedProduct([mlp.gate_proj, mlp.up_proj])
        self.inter = mlp.gate_proj.out_features
        self.act = mlp.act_fn
        self.down = mlp.down_proj
        self.desc = self.desc_addr = self.products = None


class _DirectProduct:
    """A packed product of the one-token path called straight through its prepared kernel: float32 input by
    pointer, output into a preallocated [1, 1, N] buffer, the SubLN mean square by torch's own two ops into
    preallocated buffers (the same ops, so the same bits, as ``PackedBitLinear.forward``). Skips per call the module
    machinery, the argument checks and three allocations (~10 us a product on a slow core, x 4 products x layers)."""
    __slots__ = ("fn", "addr", "prepared", "out", "out_ptr", "n_threads", "square", "ms", "ms_ptr")

    def __init__(self, prepared, in_features: int, n_threads: int | None):
        self.prepared, self.fn, self.addr = prepared, prepared._fn, prepared._addr
        self.out = torch.empty(1, 1, prepared.n, dtype=torch.float32)
        self.out_ptr, self.n_threads = self.out.data_ptr(), n_threads
        self.square = self.ms = self.ms_ptr = None
        if prepared.subln:
            self.square = torch.empty(1, 1, in_features, dtype=torch.float32)
            self.ms = torch.empty(1, 1, 1, dtype=torch.float32)
            self.ms_ptr = self.ms.data_ptr()

    def __call__(self, x: torch.Tensor, x_ptr: int, threads: int) -> int:
        if self.ms is not None:  # x.pow(2).mean(-1, keepdim=True), written in place
            torch.mean(torch.mul(x, x, out=self.square), dim=-1, keepdim=True, out=self.ms)
        self.fn(self.addr, x_ptr, 1, self.ms_ptr, self.out_ptr, self.n_threads or threads)
        return self.out_ptr


def _direct_product(module) -> "_DirectProduct | None":
    """The direct call of a packed product (a stacked FusedProduct or a PackedBitLinear), else None."""
    from .model import PackedBitLinear

    if isinstance(module, FusedProduct):
        return _DirectProduct(module.prepared, module.parts[0].in_features, module.n_threads) \
            if module.kind == "packed" else None
    if type(module) is PackedBitLinear:  # its buffers as they are now: the decoder is built per generation
        return _DirectProduct(module.prepared(), module.in_features, module.n_threads)
    return None


class LeanDecoder:
    """Greedy-decoding forward of one sequence with a static KV cache of ``max_len`` positions.

    ``decoder(input_ids [1, T])`` appends the T tokens and returns the logits of the last one, [1, vocab].
    A prompt (T > 1) runs the torch ops below; one token runs the C ops of layer.cpp (``layer_ops``) where the
    library is vectorized and the shapes fit (``self.fast``): the same arithmetic in 4 calls a layer instead of ~50."""

    def __init__(self, model: nn.Module, max_len: int, fast: bool = True, direct: bool = True):
        reason = unsupported_reason(model)
        if reason is not None:
            raise UnsupportedModelError(f"{type(model).__name__}: {reason}")
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        base = getattr(model, getattr(model, "base_model_prefix", "model"))
        self.embed, self.rotary, self.head = base.embed_tokens, base.rotary_emb, model.get_output_embeddings()
        self.norm_w, self.norm_eps = base.norm.weight, base.norm.variance_epsilon
        self.layers = [_Layer(layer) for layer in base.layers]
        self.dtype = base.norm.weight.dtype  # the hidden states' dtype
        self.max_len, self.length = max_len, 0
        first = self.layers[0]
        if any((ly.hq, ly.hk, ly.d) != (first.hq, first.hk, first.d) for ly in self.layers):
            raise UnsupportedModelError(f"{type(model).__name__}: layers with different head counts or sizes")
        shape = (len(self.layers), 1, first.hk, max_len, first.d)  # [layer, 1, kv head, position, head_dim]
        self.k_cache = torch.empty(shape, dtype=self.dtype)
        self.v_cache = torch.empty(shape, dtype=self.dtype)
        self.positions = torch.arange(max_len).unsqueeze(0)
        self.fast = fast and self._setup_fast(base)
        self.direct = self.fast and direct and self._setup_direct()

    def _setup_fast(self, base) -> bool:
        """Descriptors and buffers of the one-token path; False (torch ops) where it does not apply."""
        from . import layer_ops

        dtype, hidden = self.dtype, self.norm_w.shape[-1]
        if dtype not in layer_ops.DTYPES or not layer_ops.available() or hidden % 16:
            return False
        for i, ly in enumerate(self.layers):
            weights = [ly.in_w, ly.post_w] + [w for w in (ly.q_norm_w, ly.k_norm_w) if w is not None]
            if ly.d % 32 or ly.d > 256 or ly.hq % ly.hk or ly.inter % 16 or \
                    any(w.dtype != dtype or not w.is_contiguous() for w in weights):
                return False
            ly.desc = layer_ops.make_attn_desc(dtype, ly.hq, ly.hk, ly.d, ly.q_norm_w, ly.k_norm_w,
                                               ly.qk_eps or 0.0, ly.scaling, self.k_cache[i, 0], self.v_cache[i, 0])
            ly.desc_addr = ctypes.addressof(ly.desc)
        if self.norm_w.dtype != dtype or not self.norm_w.is_contiguous():
            return False
        first = self.layers[0]
        self._lib, self._dt = _build.load(), layer_ops.DTYPES[dtype]
        self._h = torch.empty(1, 1, hidden, dtype=dtype)        # the residual stream
        self._x = torch.empty(1, 1, hidden, dtype=dtype)        # normalized input of a product
        self._a = torch.empty(1, 1, first.hq * first.d, dtype=dtype)  # attention output
        self._m = torch.empty(1, 1, max(ly.inter for ly in self.layers), dtype=dtype)  # SwiGLU output
        return True

    def _setup_direct(self) -> bool:
        """Direct kernel calls for every product of a float32 packed model; False (module calls) otherwise."""
        if self.dtype != torch.float32:
            return False
        for ly in self.layers:
            ly.products = [_direct_product(m) for m in (ly.qkv, ly.o_proj, ly.gate_up, ly.down)]
            if any(p is None for p in ly.products):
                for layer in self.layers:
                    layer.products = None
                return False
        return True

    def reset(self) -> None:
        self.length = 0

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids must be [1, T] with T >= 1, got {tuple(input_ids.shape)}")
        t, p0 = input_ids.shape[1], self.length
        end = p0 + t
        if end > self.max_len:
            raise ValueError(f"{end} positions exceed the cache's max_len={self.max_len}")
        if t == 1 and self.fast:
            return self._step_direct(input_ids, p0) if self.direct else self._step(input_ids, p0)
        h = self.embed(input_ids)
        if h.dtype != self.dtype:
            h = h.to(self.dtype)
        cos, sin = self.rotary(h, self.positions[:, p0:end])
        cos, sin = cos.unsqueeze(2), signed_sin(sin).unsqueeze(2)  # [1, T, 1, head_dim]: broadcast over heads
        mask, causal = None, t > 1
        if t > 1 and p0 > 0:  # a chunk after cached tokens: token i sees positions <= p0 + i
            mask = torch.arange(end).unsqueeze(0) <= torch.arange(p0, end).unsqueeze(1)
            causal = False
        for i, ly in enumerate(self.layers):
            hq, hk, d = ly.hq, ly.hk, ly.d
            x = rms_norm(h, ly.in_w, ly.in_eps)
            qkv = _joined(ly.qkv(x))  # [1, T, (hq + 2 hk) d]
            qk = qkv[..., :(hq + hk) * d].view(1, t, hq + hk, d)
            if ly.qk_w is not None:
                qk = rms_norm(qk, ly.qk_w, ly.qk_eps)
            qk = rotate(qk, cos, sin)
            kc, vc = self.k_cache[i], self.v_cache[i]
            kc[:, :, p0:end] = qk[:, :, hq:].transpose(1, 2)
            vc[:, :, p0:end] = qkv[..., (hq + hk) * d:].view(1, t, hk, d).transpose(1, 2)
            o = F.scaled_dot_product_attention(qk[:, :, :hq].transpose(1, 2), kc[:, :, :end], vc[:, :, :end],
                                               attn_mask=mask, is_causal=causal, scale=ly.scaling,
                                               enable_gqa=hq != hk)
            h = h + ly.o_proj(o.transpose(1, 2).reshape(1, t, hq * d))
            x = rms_norm(h, ly.post_w, ly.post_eps)
            gu = _joined(ly.gate_up(x))
            h = h + ly.down(ly.act(gu[..., :ly.inter]) * gu[..., ly.inter:])
        self.length = end
        return self.head(rms_norm(h[:, -1:], self.norm_w, self.norm_eps))[:, -1]

    def _ready(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """A product's output as the C ops read it: contiguous, the activation dtype, n values."""
        if t.dtype is not self.dtype or not t.is_contiguous():
            t = t.to(self.dtype).contiguous()
        if t.numel() != n:
            raise ValueError(f"a projection returned {t.numel()} values, expected {n}")
        return t

    def _parts(self, outs: list[torch.Tensor], sizes: tuple[int, ...]) -> tuple[list[torch.Tensor], list[int]]:
        """Pointers to each part's values in a FusedProduct's outputs (one stacked tensor, or one per part), and
        the tensors to keep alive while they are used."""
        if len(outs) == 1:
            t = self._ready(outs[0], sum(sizes))
            ptr, es, ptrs = t.data_ptr(), t.element_size(), []
            for n in sizes:
                ptrs.append(ptr)
                ptr += n * es
            return [t], ptrs
        outs = [self._ready(t, n) for t, n in zip(outs, sizes)]
        return outs, [t.data_ptr() for t in outs]

    def _embed_and_rope(self, input_ids: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One token's embedding into the residual stream; its RoPE cos and sin as the C ops read them."""
        self._h.copy_(self.embed(input_ids))
        cos, sin = self.rotary(self._h, self.positions[:, pos:pos + 1])
        return self._ready(cos, cos.numel()), self._ready(sin, sin.numel())

    def _step(self, input_ids: torch.Tensor, pos: int) -> torch.Tensor:
        """One token through the C layer ops; the products and the head are the model's own modules."""
        lib, dt, h, x, a = self._lib, self._dt, self._h, self._x, self._a
        hidden = h.shape[-1]
        rope = self._embed_and_rope(input_ids, pos)  # (cos, sin), kept alive while their pointers are used
        hp, xp, ap, cp, sp = h.data_ptr(), x.data_ptr(), a.data_ptr(), rope[0].data_ptr(), rope[1].data_ptr()
        threads = torch.get_num_threads()
        delta = None
        for ly in self.layers:
            lib.tk_add_rmsnorm(dt, hp, None if delta is None else delta.data_ptr(), ly.in_w.data_ptr(), ly.in_eps,
                               hidden, xp)
            keep, (q, k, v) = self._parts(ly.qkv(x), ly.qkv_sizes)
            lib.tk_attn_decode(ly.desc_addr, q, k, v, cp, sp, pos, ap, threads)
            o = self._ready(ly.o_proj(a), hidden)
            lib.tk_add_rmsnorm(dt, hp, o.data_ptr(), ly.post_w.data_ptr(), ly.post_eps, hidden, xp)
            keep, (g, u) = self._parts(ly.gate_up(x), (ly.inter, ly.inter))
            m = self._m[..., :ly.inter]
            lib.tk_swiglu(dt, g, u, ly.inter, m.data_ptr())
            delta = self._ready(ly.down(m), hidden)
        lib.tk_add_rmsnorm(dt, hp, delta.data_ptr(), self.norm_w.data_ptr(), self.norm_eps, hidden, xp)
        self.length = pos + 1
        return self.head(x)[:, -1]

    def _step_direct(self, input_ids: torch.Tensor, pos: int) -> torch.Tensor:
        """``_step`` for a float32 packed model with every product called directly (``_DirectProduct``): the same
        kernels on the same buffers in the same order, so the same bits."""
        lib, dt, h, x, a = self._lib, self._dt, self._h, self._x, self._a
        hidden, fsize = h.shape[-1], 4  # float32 bytes
        rope = self._embed_and_rope(input_ids, pos)  # (cos, sin), kept alive while their pointers are used
        hp, xp, ap, cp, sp = h.data_ptr(), x.data_ptr(), a.data_ptr(), rope[0].data_ptr(), rope[1].data_ptr()
        threads = torch.get_num_threads()
        delta = None
        for ly in self.layers:
            qkv, o_proj, gate_up, down = ly.products
            q_size, k_size = ly.qkv_sizes[0], ly.qkv_sizes[1]
            lib.tk_add_rmsnorm(dt, hp, delta, ly.in_w.data_ptr(), ly.in_eps, hidden, xp)
            q = qkv(x, xp, threads)
            lib.tk_attn_decode(ly.desc_addr, q, q + q_size * fsize, q + (q_size + k_size) * fsize, cp, sp, pos, ap,
                               threads)
            lib.tk_add_rmsnorm(dt, hp, o_proj(a, ap, threads), ly.post_w.data_ptr(), ly.post_eps, hidden, xp)
            g = gate_up(x, xp, threads)
            m = self._m[..., :ly.inter]
            lib.tk_swiglu(dt, g, g + ly.inter * fsize, ly.inter, m.data_ptr())
            delta = down(m, m.data_ptr(), threads)
        lib.tk_add_rmsnorm(dt, hp, delta, self.norm_w.data_ptr(), self.norm_eps, hidden, xp)
        self.length = pos + 1
        return self.head(x)[:, -1]

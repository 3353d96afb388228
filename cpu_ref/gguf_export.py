"""Export a bitdistill student (or its full-precision Llama teacher) to GGUF for stock llama.cpp.

    python -m cpu_ref export-gguf STUDENT_DIR out.gguf --type tq2_0|tq1_0|i2_s [--embed q8_0|f16|f32] [--strict]
    python -m cpu_ref export-gguf TEACHER_DIR out.gguf --type f16|q8_0|f32      # a plain FP Llama checkpoint

The student goes to llama.cpp's ``bitnet`` architecture (LLM_ARCH_BITNET), which is a Llama block (RMSNorm, RoPE
on rotate-half pairs (NEOX), GQA attention, tied token embedding as the output head) with two extra RMSNorms,
``attn_sub_norm`` before ``attn_output`` and ``ffn_sub_norm`` before ``ffn_down``, the SubLN that bitdistill inserts
before ``o_proj`` and ``down_proj``. Its FFN is ``down(sub_norm(silu(gate(x)) * up(x)))`` (LLM_FFN_SILU,
LLM_FFN_PAR in src/models/bitnet.cpp of the llama.cpp vendored by llama-cpp-python 0.3.36; newer llama.cpp reads
``bitnet.hidden_activation`` and still defaults to SiLU, so the key is written as "silu" too) and every projection
is ``(W x) * W.scale`` where the optional ``<tensor>.scale`` is a one-value f32 tensor. So a Llama-architecture
student with SubLN maps onto it exactly, layer for layer:

    weights   the ternary codes in TQ2_0 / TQ1_0 blocks (every block's fp16 scale d = max|code| = 1, or 0 for an
              all-zero block) and the student's float32 absmean scale as ``<tensor>.scale``: lossless. A per-channel
              student (one scale a row) cannot use the one-value ``.scale``: its blocks carry the row scale as d
              instead, rounded to fp16 (relative error <= 2^-11; recorded in the file and the report).
    rows      TQ types need rows (in_features) that are a multiple of 256. Any other row length goes to Q8_0 with
              d = 1 and the codes as the int8 values (still lossless, 8.5 bits a weight) and is listed in the
              report; ``--strict`` refuses instead, naming the tensor.
    floats    norms in f32; the token embedding (also the head) in ``--embed`` (q8_0 default, f16, f32).

``--type i2_s`` writes the same graph for bitnet.cpp (microsoft/BitNet's llama.cpp fork, whose ggml has type
I2_S = 36 and file type 40; stock llama.cpp does not load it). I2_S is one fp32 scale per tensor, the one our
per-tensor student has, and its matmul quantizes the activations to int8 per token (127 / absmax), as the student
does. Its layout (ggml-bitnet-mad.cpp ``quantize_i2_s``): the tensor flattened, cut in blocks of 128 values, each
32 bytes where byte j holds the 2-bit codes (value + 1) of values j, 32 + j, 64 + j and 96 + j at bits 6, 4, 2 and 0;
then the scale as fp32 and 28 bytes of padding (``n / 4 + 32`` bytes in all). Rows must be a multiple of 128 (its dot
product drops a row's tail). bitnet.cpp's standard (TL2) build has no ``<tensor>.scale`` tensors, so a linear whose
rows are not a multiple of 128 goes to Q8_0 with the codes and d = the scale rounded to fp16 (relative error
<= 2^-11, listed in the report); ``--strict`` refuses instead. Per-channel students are refused (one scale a tensor).

What differs at run time is only the activation quantization: the student quantizes each token's whole row to int8
(absmax / 127), llama.cpp's TQ / Q8_0 dot products quantize activations per 256- (Q8_K) or 32-value (Q8_0) block,
and its KV cache is f16. ``python -m cpu_ref check-gguf`` measures the effect.

Refused, with the reason: students that are not Llama-architecture (Qwen2/Qwen3: q/k norms or q/k/v biases that no
stock graph with SubLN has), without SubLN, not quantized, with an untied lm_head (the bitnet graph's head is the
token embedding), with RoPE scaling, biases, another activation than SiLU, a SubLN epsilon other than the model's
rms_norm_eps (llama.cpp uses one epsilon for every norm), or n_heads * head_dim != hidden_size.

The full-precision teacher (a checkpoint without a bitdistill record) goes to the ``llama`` architecture: q/k rows
permuted as convert_hf_to_gguf.py's LlamaModel does for llama.cpp's adjacent-pair (NORM) RoPE.

The tokenizer must be a byte-level BPE ``tokenizer.json`` (the gpt2 tokenizer model in llama.cpp, as SmolLM2 and
Llama 3 have). The pre-tokenizer name is found as convert_hf_to_gguf.py finds it (a hash of a fixed text's tokens;
known: smollm, llama-bpe, gpt-2, qwen2), else "gpt-2" for a plain ByteLevel pre-tokenizer, else "default" with a
warning; ``--tokenizer-pre`` overrides it.

The file is written to a temporary name in the target folder and renamed when complete: a failure leaves nothing.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import warnings

import numpy as np

QK_K = 256
TERNARY_TYPES = ("tq2_0", "tq1_0", "i2_s")
I2_S_TYPE = 36        # bitnet.cpp's GGML_TYPE_I2_S
I2_S_FILE_TYPE = 40   # bitnet.cpp's LLAMA_FTYPE_MOSTLY_I2_S
I2_S_BLOCK = 128
FP_TYPES = ("f16", "q8_0", "f32")
EMBED_TYPES = ("q8_0", "f16", "f32")
# convert_hf_to_gguf.py's get_vocab_base_pre: sha256 of str(tokenizer.encode(CHKTXT)) -> llama.cpp pre-tokenizer
KNOWN_PRE = {"855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
             "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
             "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
             "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2"}
CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ '
          '🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
          '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
          '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
LAYER_MAP = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
             "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
             "self_attn.o_proj.subln.weight": "attn_sub_norm.weight",
             "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
             "mlp.down_proj.weight": "ffn_down.weight", "mlp.down_proj.subln.weight": "ffn_sub_norm.weight"}


class GGUFExportError(ValueError):
    """The model cannot be written as a GGUF that stock llama.cpp runs as the same function."""


def _gguf():
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - the message is the point
        raise GGUFExportError("GGUF export needs the `gguf` package (pip install gguf)") from exc
    return gguf


def representability_problems(config, record: dict | None, param_names: list[str]) -> list[str]:
    """Why this student can't be llama.cpp's ``bitnet`` architecture exactly ([] if it can)."""
    c = config
    problems = []
    if record is None:
        return ["no bitdistill conversion record in config.json: not a student (a full-precision checkpoint "
                "exports with --type f16|q8_0|f32)"]
    if getattr(c, "model_type", None) != "llama":
        extra = [n for n in param_names if n.endswith(("q_norm.weight", "k_norm.weight"))]
        why = (f"its attention has q/k norms ({extra[0]}, ...) that llama.cpp's bitnet graph does not apply, and "
               "llama.cpp's qwen3 graph has no SubLN" if extra else "only Llama-architecture students map onto "
               "llama.cpp's bitnet graph")
        problems.append(f"model_type {getattr(c, 'model_type', None)!r}: {why}")
    if not record.get("subln"):
        problems.append("converted without SubLN: the bitnet graph always applies attn_sub_norm / ffn_sub_norm")
    if not record.get("quantize", True):
        problems.append("converted with quantize=False: the linears are not ternary")
    if not getattr(c, "tie_word_embeddings", False):
        problems.append("untied lm_head: llama.cpp's bitnet graph uses the token embedding as the output head")
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False) or any(
            n.endswith(".bias") for n in param_names):
        problems.append("linear biases: the bitnet graph has none")
    if getattr(c, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {c.hidden_act!r}: the bitnet graph's FFN is SiLU-gated")
    rope = getattr(c, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        problems.append(f"rope_scaling {rope}: the bitnet graph has no RoPE scaling (no rope_freqs tensor)")
    eps = float(getattr(c, "rms_norm_eps", 1e-6))
    if record.get("subln") and abs(float(record.get("subln_eps", eps)) - eps) > 1e-12:
        problems.append(f"SubLN epsilon {record['subln_eps']} != rms_norm_eps {eps}: llama.cpp uses one epsilon")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if head_dim * c.num_attention_heads != c.hidden_size:
        problems.append(f"num_attention_heads * head_dim = {c.num_attention_heads * head_dim} != hidden_size "
                        f"{c.hidden_size}: the bitnet graph's attn_q is hidden x hidden")
    return problems


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half rows -> llama.cpp's adjacent-pair RoPE rows (convert_hf_to_gguf.py LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def i2_s_bytes(codes: np.ndarray, scale: float) -> np.ndarray:
    """I2_S bytes (uint8, ``codes.size // 4 + 32``) of int8 ``codes`` in {-1, 0, 1} with one float32 ``scale``."""
    n = codes.size
    if n % I2_S_BLOCK:
        raise GGUFExportError(f"I2_S packs blocks of {I2_S_BLOCK} values; got {n}")
    q = (codes.reshape(-1, 4, 32).astype(np.uint8) + 1)  # [block, value // 32 within the block, j]
    packed = (q[:, 0] << 6) | (q[:, 1] << 4) | (q[:, 2] << 2) | q[:, 3]
    tail = np.zeros(32, np.uint8)
    tail[:4] = np.frombuffer(np.float32(scale).tobytes(), np.uint8)
    return np.concatenate([packed.reshape(-1), tail])


def q8_0_blocks(values: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Q8_0 bytes [rows, cols // 32 * 34] of integer ``values`` (|v| <= 127) with per-row fp16 scales ``d``."""
    rows, cols = values.shape
    qs = values.astype(np.int8).reshape(rows, cols // 32, 32).view(np.uint8)
    dd = np.broadcast_to(d.astype(np.float16).reshape(-1, 1, 1), (rows, cols // 32, 1)).copy().view(np.uint8)
    return np.concatenate([dd.reshape(rows, cols // 32, 2), qs], axis=-1).reshape(rows, -1)


def _float_tensor(gguf, arr: np.ndarray, kind: str):
    """(data, raw_dtype) of a float matrix in f32 / f16 / q8_0 (q8_0 falls back to f16 for rows not a multiple
    of 32)."""
    if kind == "f32" or arr.ndim == 1:
        return arr.astype(np.float32), None
    if kind == "q8_0" and arr.shape[-1] % 32 == 0:
        Q = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(arr.astype(np.float32), Q), Q
    return arr.astype(np.float16), None


class _Writer:
    """GGUFWriter to a temporary path, renamed onto ``out`` by ``commit``."""

    def __init__(self, out, arch: str):
        gguf = _gguf()
        self.out = pathlib.Path(out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out.with_name(f".{self.out.name}.tmp-{os.getpid()}")
        self.w = gguf.GGUFWriter(str(self.tmp), arch)

    def commit(self):
        self.w.write_header_to_file()
        self.w.write_kv_data_to_file()
        self.w.write_tensors_to_file()
        self.w.close()
        os.replace(self.tmp, self.out)

    def abort(self):
        try:
            self.w.close()
        except Exception:
            pass
        self.tmp.unlink(missing_ok=True)


def _hparams(w, config, arch_eps: float, file_type: int, name: str):
    gguf = _gguf()
    c = config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_name(name)
    w.add_context_length(int(c.max_position_embeddings))
    w.add_embedding_length(int(c.hidden_size))
    w.add_block_count(int(c.num_hidden_layers))
    w.add_feed_forward_length(int(c.intermediate_size))
    w.add_head_count(int(c.num_attention_heads))
    w.add_head_count_kv(int(getattr(c, "num_key_value_heads", None) or c.num_attention_heads))
    w.add_rope_dimension_count(int(head_dim))
    w.add_rope_freq_base(float(getattr(c, "rope_theta", None) or (getattr(c, "rope_parameters", None) or {}).get(
        "rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(arch_eps))
    w.add_vocab_size(int(c.vocab_size))
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def vocab_pre(tokenizer) -> tuple[str, str | None]:
    """(llama.cpp pre-tokenizer name, warning or None) of a fast BPE tokenizer."""
    chkhsh = hashlib.sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
    if chkhsh in KNOWN_PRE:
        return KNOWN_PRE[chkhsh], None
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    pre, norm = spec.get("pre_tokenizer") or {}, spec.get("normalizer")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not norm:
        return "gpt-2", None  # the GPT-2 split regex over bytes: llama.cpp's gpt-2 pre-tokenizer
    return "default", (f"unknown pre-tokenizer (hash {chkhsh[:12]}..., {pre.get('type')}): wrote 'default'; llama.cpp "
                       "may split text differently from the HF tokenizer (pass --tokenizer-pre NAME)")


def add_vocab(w, tok_dir, vocab_size: int, tokenizer_pre: str | None = None) -> dict:
    """The gpt2 (byte-level BPE) vocabulary as convert_hf_to_gguf.py's _set_vocab_gpt2 writes it."""
    gguf = _gguf()
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    except Exception as exc:
        raise GGUFExportError(f"{tok_dir}: no usable tokenizer ({exc}); llama.cpp needs the vocabulary") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise GGUFExportError(f"{tok_dir}: only fast (tokenizer.json) byte-level BPE tokenizers are exported")
    model_type = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["type"]
    if model_type != "BPE":
        raise GGUFExportError(f"{tok_dir}: tokenizer model {model_type!r}: only byte-level BPE (llama.cpp's gpt2 "
                              "tokenizer model) is exported")
    if max(tokenizer.vocab.values()) >= vocab_size:
        raise GGUFExportError(f"{tok_dir}: tokenizer ids reach {max(tokenizer.vocab.values())}, beyond the model's "
                              f"vocab_size {vocab_size}")
    pre, warning = (tokenizer_pre, None) if tokenizer_pre else vocab_pre(tokenizer)
    reverse = {i: t for t, i in tokenizer.vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tok = reverse[i]
        if tok in added:
            special = decoder[i].special or (tok.startswith("<|") and tok.endswith("|>"))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(tok)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(str(tok_dir), load_merges=True, n_vocab=vocab_size)
    ids = tokenizer("a")["input_ids"]
    adds_bos = tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id
    special.add_special_token["bos"] = adds_bos  # what the HF tokenizer does, so both tokenize prompts alike
    special.add_special_token.setdefault("eos", False)
    special.add_to_gguf(w)
    return {"tokenizer_pre": pre, "n_tokens": len(tokens), "add_bos": adds_bos,
            "warnings": [warning] if warning else []}


def byte_level_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table (byte-level BPE), in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra, table = 0, {}
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def add_placeholder_vocab(w, vocab_size: int) -> dict:
    """A stand-in gpt2 vocabulary for a model without a tokenizer (benchmarks feed token ids): the 256 byte-level
    symbols, then "[T<i>]" placeholders, one merge (llama.cpp requires the key). Text through it means nothing."""
    if vocab_size < 256:
        raise GGUFExportError(f"a placeholder vocabulary needs vocab_size >= 256, got {vocab_size}")
    gguf = _gguf()
    alphabet = byte_level_alphabet()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(alphabet + [f"[T{i}]" for i in range(256, vocab_size)])
    w.add_token_types([gguf.TokenType.NORMAL] * vocab_size)
    w.add_token_merges([f"{alphabet[0]} {alphabet[1]}"])
    w.add_eos_token_id(vocab_size - 1)
    return {"tokenizer_pre": "default", "n_tokens": vocab_size, "add_bos": False,
            "warnings": ["placeholder vocabulary (no tokenizer): token ids only"]}


def _vocab(w, model_dir, vocab_size: int, vocab: str, tokenizer_pre: str | None) -> dict:
    if vocab == "placeholder":
        return add_placeholder_vocab(w, vocab_size)
    if vocab != "tokenizer":
        raise GGUFExportError(f"vocab {vocab!r}: 'tokenizer' or 'placeholder'")
    return add_vocab(w, model_dir, vocab_size, tokenizer_pre)


def _ternary(gguf, codes: np.ndarray, scale: np.ndarray, kind: str, name: str, strict: bool):
    """[(gguf name, data, raw_dtype)] of one ternary linear, and a note (fallback / lossy scales) or None."""
    rows, cols = codes.shape
    per_row = scale.size > 1
    note = None
    if kind == "i2_s":
        return _ternary_i2_s(codes, scale, name, strict)
    if cols % QK_K == 0:
        Q = gguf.GGMLQuantizationType.TQ2_0 if kind == "tq2_0" else gguf.GGMLQuantizationType.TQ1_0
        values = codes.astype(np.float32) * (scale.reshape(-1, 1) if per_row else np.float32(1.0))
        data = gguf.quants.quantize(values, Q)
    elif strict:
        raise GGUFExportError(f"{name}: rows of {cols} values are not a multiple of {QK_K}, which "
                              f"{kind.upper()} needs (drop --strict to store such tensors as Q8_0, lossless)")
    else:
        Q = gguf.GGMLQuantizationType.Q8_0
        if cols % 32:
            raise GGUFExportError(f"{name}: rows of {cols} values fit neither {kind.upper()} (256) nor Q8_0 (32)")
        data = q8_0_blocks(codes, scale.reshape(-1) if per_row else np.ones(rows, np.float32))
        note = f"{name}: {cols} values a row (not a multiple of {QK_K}) -> Q8_0, codes with d=1"
    out = [(name, data, Q, None)]
    if not per_row:
        out.append((name.removesuffix(".weight") + ".scale", np.asarray([scale.item()], np.float32), None, None))
    return out, note


def _ternary_i2_s(codes: np.ndarray, scale: np.ndarray, name: str, strict: bool):
    """As ``_ternary`` for bitnet.cpp's I2_S: the scale inside the tensor, no ``.scale`` tensor."""
    rows, cols = codes.shape
    if cols % I2_S_BLOCK == 0:
        # int8 view: gguf-py only derives a shape from uint8 bytes of the types it knows; raw_shape gives it
        return [(name, i2_s_bytes(codes, scale.item()).view(np.int8), I2_S_TYPE, (rows, cols))], None
    if strict:
        raise GGUFExportError(f"{name}: rows of {cols} values are not a multiple of {I2_S_BLOCK}, which I2_S "
                              "needs (drop --strict to store such tensors as Q8_0 with the scale rounded to fp16)")
    if cols % 32:
        raise GGUFExportError(f"{name}: rows of {cols} values fit neither I2_S ({I2_S_BLOCK}) nor Q8_0 (32)")
    s = np.float32(scale.item())
    d = np.float16(s)
    rel = abs(float(d) - float(s)) / max(abs(float(s)), 1e-30)
    note = (f"{name}: {cols} values a row (not a multiple of {I2_S_BLOCK}) -> Q8_0, codes with d = fp16(scale) "
            f"(relative rounding {rel:.1e})")
    return [(name, q8_0_blocks(codes, np.full(rows, d, np.float32)), _gguf().GGMLQuantizationType.Q8_0, None)], note


def export_student(student_dir, out, kind: str = "tq2_0", embed: str = "q8_0", strict: bool = False,
                   tokenizer_pre: str | None = None, vocab: str = "tokenizer") -> dict:
    """Write the student in ``student_dir`` as a llama.cpp ``bitnet`` GGUF at ``out``; return a report."""
    if kind not in TERNARY_TYPES:
        raise GGUFExportError(f"--type {kind!r}: a student exports as {' or '.join(TERNARY_TYPES)}")
    if embed not in EMBED_TYPES:
        raise GGUFExportError(f"--embed {embed!r}: choose among {EMBED_TYPES}")
    gguf = _gguf()
    from transformers import AutoConfig
    from safetensors import safe_open

    from bitdistill.convert import CONVERSION_KEY, _read_state_dict
    from bitkernels.reference import ternarize_absmean

    student_dir = pathlib.Path(student_dir)
    config = AutoConfig.from_pretrained(str(student_dir))
    record = getattr(config, CONVERSION_KEY, None)
    weights = student_dir / "model.safetensors"
    if weights.is_file():
        with safe_open(str(weights), framework="pt") as f:
            names = list(f.keys())
    else:
        names = list(_read_state_dict(student_dir))
    problems = representability_problems(config, record, names)
    if problems:
        raise GGUFExportError(f"{student_dir}: cannot be written as llama.cpp's bitnet architecture exactly: "
                              + "; ".join(problems))
    state = _read_state_dict(student_dir)
    state.pop("lm_head.weight", None)  # tied: the head is the embedding
    n_layers = config.num_hidden_layers
    ternary = {"attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight", "ffn_gate.weight",
               "ffn_up.weight", "ffn_down.weight"}
    per_channel = bool(record.get("per_channel"))
    if kind == "i2_s" and per_channel:
        raise GGUFExportError(f"{student_dir}: per-channel scales: I2_S holds one scale a tensor (export it with "
                              "--type tq2_0 or tq1_0, whose blocks carry the row scale)")
    ftype = {"tq2_0": gguf.LlamaFileType.MOSTLY_TQ2_0, "tq1_0": gguf.LlamaFileType.MOSTLY_TQ1_0,
             "i2_s": I2_S_FILE_TYPE}[kind]
    tensors, notes, used = [], [], set()
    for hf, g in (("model.embed_tokens.weight", "token_embd.weight"), ("model.norm.weight", "output_norm.weight")):
        if hf not in state:
            raise GGUFExportError(f"{student_dir}: no {hf} in the checkpoint")
        used.add(hf)
        data, raw = _float_tensor(gguf, state[hf].float().numpy(), embed if g == "token_embd.weight" else "f32")
        tensors.append((g, data, raw, None))
    for i in range(n_layers):
        for suffix, g in LAYER_MAP.items():
            hf = f"model.layers.{i}.{suffix}"
            if hf not in state:
                raise GGUFExportError(f"{student_dir}: no {hf} in the checkpoint")
            used.add(hf)
            name = f"blk.{i}.{g}"
            if g in ternary:
                codes, scale = ternarize_absmean(state[hf].float(), per_channel=per_channel)
                parts, note = _ternary(gguf, codes.numpy(), scale.float().numpy(), kind, name, strict)
                tensors += parts
                if note:
                    notes.append(note)
            else:
                tensors.append((name, state[hf].float().numpy().astype(np.float32), None, None))
    left = sorted(set(state) - used)
    if left:
        raise GGUFExportError(f"{student_dir}: tensors with no place in llama.cpp's bitnet graph: {left[:6]}")
    if per_channel:  # (TQ types only: I2_S refused per-channel above)
        notes.append("per-channel scales: stored as each block's fp16 d (relative rounding <= 2^-11)")
    w = _Writer(out, "bitnet")
    try:
        _hparams(w.w, config, float(getattr(config, "rms_norm_eps", 1e-6)), ftype, student_dir.name)
        w.w.add_string("bitnet.hidden_activation", "silu")
        w.w.add_string("bitkernels.export", json.dumps({"source": "bitdistill student", "type": kind,
                                                        "embed": embed, "per_channel": per_channel,
                                                        "notes": notes}))
        vocab = _vocab(w.w, student_dir, int(config.vocab_size), vocab, tokenizer_pre)
        for name, data, raw, shape in tensors:
            w.w.add_tensor(name, data, raw_shape=shape, raw_dtype=raw)
        w.commit()
    except BaseException:
        w.abort()
        raise
    for msg in vocab["warnings"]:
        warnings.warn(msg)
    return {"out": str(out), "arch": "bitnet", "runtime": "bitnet.cpp" if kind == "i2_s" else "llama.cpp",
            "type": kind, "embed": embed, "bytes": pathlib.Path(out).stat().st_size,
            "n_tensors": len(tensors), "fallbacks": notes, "vocab": vocab}


def export_fp_llama(model_dir, out, kind: str = "f16", tokenizer_pre: str | None = None,
                    vocab: str = "tokenizer") -> dict:
    """Write a plain full-precision Llama checkpoint as a llama.cpp ``llama`` GGUF (f16 / q8_0 / f32 matrices)."""
    if kind not in FP_TYPES:
        raise GGUFExportError(f"--type {kind!r}: a full-precision model exports as {' / '.join(FP_TYPES)}")
    gguf = _gguf()
    from transformers import AutoConfig

    from bitdistill.convert import CONVERSION_KEY, _read_state_dict

    model_dir = pathlib.Path(model_dir)
    config = AutoConfig.from_pretrained(str(model_dir))
    if getattr(config, CONVERSION_KEY, None) is not None:
        raise GGUFExportError(f"{model_dir}: a bitdistill student: export it with --type tq2_0 or tq1_0")
    if getattr(config, "model_type", None) != "llama":
        raise GGUFExportError(f"{model_dir}: model_type {getattr(config, 'model_type', None)!r}: only Llama "
                              "checkpoints are exported to the llama architecture")
    problems = [p for p in representability_problems(config, {"subln": False}, [])
                if not p.startswith(("model_type", "converted without SubLN", "untied"))]
    if problems:
        raise GGUFExportError(f"{model_dir}: cannot be written as llama.cpp's llama architecture exactly: "
                              + "; ".join(problems))
    state = _read_state_dict(model_dir)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied:
        state.pop("lm_head.weight", None)
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    ftype = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
             "f32": gguf.LlamaFileType.ALL_F32}[kind]
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    w = _Writer(out, "llama")
    try:
        _hparams(w.w, config, float(getattr(config, "rms_norm_eps", 1e-6)), ftype, model_dir.name)
        vocab = _vocab(w.w, model_dir, int(config.vocab_size), vocab, tokenizer_pre)
        for hf, t in state.items():
            if hf in names:
                g = names[hf]
            else:
                parts = hf.split(".")
                suffix = ".".join(parts[3:])
                if parts[:2] != ["model", "layers"] or suffix not in LAYER_MAP or ".subln." in suffix:
                    raise GGUFExportError(f"{model_dir}: tensor {hf} has no place in llama.cpp's llama graph")
                g = f"blk.{parts[2]}.{LAYER_MAP[suffix]}"
            arr = t.float().numpy()
            if g.endswith("attn_q.weight"):
                arr = _permute_qk(arr, n_head)
            elif g.endswith("attn_k.weight"):
                arr = _permute_qk(arr, n_kv)
            data, raw = _float_tensor(gguf, arr, kind)
            w.w.add_tensor(g, data, raw_dtype=raw)
        w.commit()
    except BaseException:
        w.abort()
        raise
    return {"out": str(out), "arch": "llama", "type": kind, "bytes": pathlib.Path(out).stat().st_size,
            "vocab": vocab}


def export_gguf(model_dir, out, kind: str = "tq2_0", embed: str = "q8_0", strict: bool = False,
                tokenizer_pre: str | None = None, vocab: str = "tokenizer") -> dict:
    """A student (``kind`` tq2_0 / tq1_0) or a full-precision Llama (``kind`` f16 / q8_0 / f32) -> GGUF.
    ``vocab="placeholder"``: no tokenizer needed (a stand-in vocabulary, for benchmarks on token ids)."""
    if kind in FP_TYPES:
        return export_fp_llama(model_dir, out, kind, tokenizer_pre, vocab)
    return export_student(model_dir, out, kind, embed, strict, tokenizer_pre, vocab)

"""Run an exported GGUF in llama.cpp (through llama-cpp-python) and compare it with the PyTorch student.

    python -m cpu_ref check-gguf STUDENT_DIR out.gguf [--prompts "text" ...] [--tokens 32] [--threads N]

For each prompt (tokenized by the HF tokenizer; the same ids go to both, so the model is compared, not the
tokenizer) the student greedily generates ``--tokens`` tokens. On that sequence, teacher-forced, both give the
next-token logits at the ``--tokens`` positions: reported are the fraction of positions whose argmax agree, the
logits' relative error ||l_llama - l_torch|| / ||l_torch|| (Frobenius, over those positions), and the max abs
difference. llama.cpp also generates greedily on its own from the prompt: the fraction of the ``--tokens``
positions equal to the student's and the first one that differs. Whether llama.cpp's own tokenization of the text
equals the HF tokenizer's is reported too.

The same is done for the student with llama.cpp's activation quantization in place of our per-token int8
(``llama_cpp_activation_blocks``): its greedy tokens against the student's say how much of a greedy mismatch the
runtime's quantization alone explains, and llama.cpp's logits against it how much is left for the export.

An I2_S file runs in bitnet.cpp instead (microsoft/BitNet's llama.cpp fork; stock llama.cpp has no I2_S):
``--bitnet-cpp DIR`` names a built checkout (DIR/3rdparty/llama.cpp/include, DIR/build/3rdparty/llama.cpp/src/
libllama.so) and ``BitnetCpp`` drives it through a small C shim (bitnet_cpp_shim.c) compiled against its llama.h.
There the I2_S matmuls quantize activations per token, as the student does, so the activation-block columns keep
per-token int8 on those rows and use blocks only on the Q8_0 ones.

``make_llama_student`` builds the small random Llama-architecture student (SubLN, tied embedding, byte-level BPE
tokenizer) that the tests and the benchmark use.
"""
from __future__ import annotations

import contextlib
import os
import pathlib

import numpy as np
import torch

DEFAULT_PROMPTS = ("the movie was great in the morning.", "my friend said the book was",
                   "a neighbor visited the park last week. it was")


def llama_cpp_available() -> tuple[bool, str]:
    try:
        import llama_cpp  # noqa: F401
    except Exception as exc:  # ImportError, or a shared library that does not load
        return False, f"llama-cpp-python is not usable here ({type(exc).__name__}: {exc})"
    return True, getattr(llama_cpp, "__version__", "?")


class BitnetCpp:
    """A GGUF in bitnet.cpp, with the part of ``llama_cpp.Llama``'s interface that this module uses: ``reset``,
    ``eval`` (next-token logits of each token appended to ``scores``), ``n_tokens``, ``tokenize``."""

    def __init__(self, checkout, path, n_ctx: int = 512, n_threads: int | None = None):
        import ctypes

        lib = ctypes.CDLL(str(build_bitnet_cpp_shim(checkout)))
        lib.bk_open.restype = ctypes.c_void_p
        lib.bk_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
        for name in ("bk_n_vocab", "bk_reset", "bk_close"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
        lib.bk_eval.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
        lib.bk_tokenize.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                    ctypes.c_int]
        self._lib, self.n_ctx = lib, n_ctx
        self._h = lib.bk_open(str(path).encode(), n_ctx, n_threads or 0)
        if not self._h:
            raise RuntimeError(f"bitnet.cpp could not load {path} (its log above says why)")
        self.n_vocab = lib.bk_n_vocab(self._h)
        self.scores: list[np.ndarray] = []

    @property
    def n_tokens(self) -> int:
        return len(self.scores)

    def reset(self):
        self._lib.bk_reset(self._h)
        self.scores = []

    def eval(self, tokens):
        ids = np.ascontiguousarray(tokens, dtype=np.int32)
        if self.n_tokens + ids.size > self.n_ctx:
            raise ValueError(f"{self.n_tokens + ids.size} tokens exceed the context of {self.n_ctx}")
        out = np.empty((ids.size, self.n_vocab), np.float32)
        rc = self._lib.bk_eval(self._h, ids.ctypes.data, ids.size, out.ctypes.data)
        if rc:
            raise RuntimeError(f"bitnet.cpp llama_decode returned {rc}")
        self.scores.extend(out)

    def tokenize(self, text: bytes, add_bos: bool = False, special: bool = False) -> list[int]:
        out = np.empty(len(text) + 8, np.int32)
        n = self._lib.bk_tokenize(self._h, text, int(add_bos), int(special), out.ctypes.data, out.size)
        if n < 0:
            raise RuntimeError("bitnet.cpp tokenize: buffer too short")
        return out[:n].tolist()

    def __del__(self):
        if getattr(self, "_h", None):
            self._lib.bk_close(self._h)
            self._h = None


def build_bitnet_cpp_shim(checkout) -> pathlib.Path:
    """bitnet_cpp_shim.c compiled against a built bitnet.cpp checkout (cached per source and library)."""
    import hashlib
    import subprocess

    from ._build import cache_dir

    root = pathlib.Path(checkout)
    llama = root / "3rdparty" / "llama.cpp"
    libdir = root / "build" / "3rdparty" / "llama.cpp" / "src"
    ggml_libdir = root / "build" / "3rdparty" / "llama.cpp" / "ggml" / "src"
    header = llama / "include" / "llama.h"
    if not header.is_file() or not (libdir / "libllama.so").is_file():
        raise FileNotFoundError(f"{root}: not a built bitnet.cpp checkout (need {header} and {libdir / 'libllama.so'}; "
                                "build it as its README says: setup_env.py, or cmake -B build && cmake --build build)")
    src = pathlib.Path(__file__).with_name("bitnet_cpp_shim.c")
    key = hashlib.sha256(src.read_bytes() + header.read_bytes() + str(libdir.resolve()).encode()).hexdigest()[:16]
    out = cache_dir() / f"bitnet_cpp_shim-{key}.so"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}")
        cmd = ["gcc", "-O2", "-shared", "-fPIC", str(src), "-o", str(tmp), f"-I{llama / 'include'}",
               f"-I{llama / 'ggml' / 'include'}", f"-L{libdir}", f"-L{ggml_libdir}", "-lllama", "-lggml",
               f"-Wl,-rpath,{libdir.resolve()}", f"-Wl,-rpath,{ggml_libdir.resolve()}"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"building the bitnet.cpp shim failed:\n{' '.join(cmd)}\n{r.stderr[-2000:]}")
        os.replace(tmp, out)
    return out


def load_llama(path, n_ctx: int = 512, n_threads: int | None = None, logits_all: bool = True, bitnet_cpp=None):
    """llama-cpp-python's Llama on ``path``, or with ``bitnet_cpp`` (a built checkout) bitnet.cpp's runtime."""
    if bitnet_cpp is not None:
        return BitnetCpp(bitnet_cpp, path, n_ctx, n_threads)
    from llama_cpp import Llama

    kw = {} if n_threads is None else {"n_threads": n_threads, "n_threads_batch": n_threads}
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(512, n_ctx), logits_all=logits_all,
                 verbose=False, **kw)


def llama_logits(llm, tokens: list[int]) -> np.ndarray:
    """Next-token logits [len(tokens), vocab] of ``tokens`` in one evaluation from an empty cache."""
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[:len(tokens)], dtype=np.float32)


def llama_greedy(llm, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    return out


@contextlib.contextmanager
def llama_cpp_activation_blocks(model, i2_s: bool = False):
    """The model's BitLinears quantize activations as llama.cpp's CPU dot products do, instead of per token: int8
    codes with one scale per block of 256 (Q8_K, the operand of TQ1_0 / TQ2_0 weights) where the row length is a
    multiple of 256, else per block of 32 with an fp16 scale (Q8_0, the type the export gives such rows).
    ``i2_s``: as bitnet.cpp runs an I2_S export, whose rows of a multiple of 128 keep the student's per-token int8."""
    from bitkernels import BitLinear
    from bitkernels.reference import dequantize_int8, ternarize_absmean

    from .gguf_export import I2_S_BLOCK

    def blocked(m: BitLinear, w_deq: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = (x if m.subln is None else m.subln(x)).float()
        k = h.shape[-1]
        block = 256 if k % 256 == 0 else 32
        hb = h.reshape(-1, k // block, block)
        d = hb.abs().amax(-1, keepdim=True) / 127
        if block == 32:
            d = d.half().float()
        hq = (torch.round(hb / d.clamp_min(1e-30)).clamp(-127, 127) * d).reshape(h.shape)
        y = torch.nn.functional.linear(hq, w_deq)
        return (y if m.bias is None else y + m.bias.float()).to(x.dtype)

    def ternary_weight(m: BitLinear) -> torch.Tensor:
        # Once per module, not per call: generation runs every linear once a token.
        return dequantize_int8(*ternarize_absmean(m.weight, m.per_channel), torch.float32)

    patched = [m for m in model.modules() if isinstance(m, BitLinear) and m.quantize and not m.frozen
               and not (i2_s and m.in_features % I2_S_BLOCK == 0)]
    for m in patched:
        m.forward = lambda x, m=m, w_deq=ternary_weight(m): blocked(m, w_deq, x)
    try:
        yield model
    finally:
        for m in patched:
            del m.forward


def compare(student_dir, gguf_path, prompts=DEFAULT_PROMPTS, n_tokens: int = 32, n_threads: int | None = None,
            model=None, prompt_ids: list[list[int]] | None = None, bitnet_cpp=None) -> dict:
    """The comparison above, per prompt and overall. ``prompt_ids``: token ids instead of text (no tokenizer
    needed; tokenization is then not compared). ``model``: the student, already loaded. ``bitnet_cpp``: a built
    bitnet.cpp checkout to run the file in, instead of llama-cpp-python."""
    from bitdistill.convert import load_student

    from .gguf_reader import read_gguf
    from .runner import greedy_generate

    model = model if model is not None else load_student(student_dir, backend="torch", dtype=torch.float32)
    if prompt_ids is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(student_dir))
        ids_list = [tokenizer(p)["input_ids"] for p in prompts]
    else:
        tokenizer, ids_list, prompts = None, [list(map(int, i)) for i in prompt_ids], [None] * len(prompt_ids)
    llm = load_llama(gguf_path, n_ctx=max(len(i) for i in ids_list) + n_tokens + 8, n_threads=n_threads,
                     bitnet_cpp=bitnet_cpp)
    i2_s = any(t.type_name == "I2_S" for t in read_gguf(gguf_path).tensors.values())
    rows = []
    for prompt, ids in zip(prompts, ids_list):
        P = len(ids)
        seq = greedy_generate(model, torch.tensor([ids]), n_tokens)["tokens"][0]
        with torch.inference_mode():
            ref = model(input_ids=seq[None]).logits[0, P - 1:P - 1 + n_tokens].float().numpy()
        got = llama_logits(llm, seq.tolist())[P - 1:P - 1 + n_tokens]
        own = llama_greedy(llm, ids, n_tokens)
        student_new = seq[P:P + n_tokens].tolist()
        equal = [a == b for a, b in zip(own, student_new)]
        with llama_cpp_activation_blocks(model, i2_s=i2_s), torch.inference_mode():
            blocks_new = greedy_generate(model, torch.tensor([ids]), n_tokens, loop="hf")["tokens"][0][P:P + n_tokens].tolist()
            blocks = model(input_ids=seq[None]).logits[0, P - 1:P - 1 + n_tokens].float().numpy()
        same_tokens = None
        if tokenizer is not None:
            llama_ids = llm.tokenize(prompt.encode(), add_bos=bool(ids) and ids[0] == tokenizer.bos_token_id,
                                     special=False)
            same_tokens = list(llama_ids) == list(ids)
        rows.append({"prompt": prompt if prompt is not None else ids, "prompt_tokens": P,
                     "argmax_agree": float((ref.argmax(-1) == got.argmax(-1)).mean()),
                     "logits_rel_err": float(np.linalg.norm(got - ref) / np.linalg.norm(ref)),
                     "logits_max_abs_diff": float(np.abs(got - ref).max()),
                     "logits_max_abs": float(np.abs(ref).max()),
                     "greedy_equal_frac": float(np.mean(equal)),
                     "first_differing_token": next((j for j, e in enumerate(equal) if not e), None),
                     "blocks_greedy_equal_frac": float(np.mean([a == b for a, b in zip(blocks_new, student_new)])),
                     "blocks_logits_rel_err": float(np.linalg.norm(blocks - ref) / np.linalg.norm(ref)),
                     "llama_vs_blocks_logits_rel_err": float(np.linalg.norm(got - blocks) / np.linalg.norm(blocks)),
                     "tokenization_equal": same_tokens})
    keys = ("argmax_agree", "logits_rel_err", "greedy_equal_frac", "blocks_greedy_equal_frac",
            "blocks_logits_rel_err", "llama_vs_blocks_logits_rel_err")
    return {"gguf": str(gguf_path), "runtime": "bitnet.cpp" if bitnet_cpp is not None else "llama.cpp",
            "n_tokens": n_tokens, "prompts": rows,
            **{f"mean_{k}": float(np.mean([r[k] for r in rows])) for k in keys},
            "max_logits_rel_err": max(r["logits_rel_err"] for r in rows),
            "tokenization_equal": None if tokenizer is None else all(r["tokenization_equal"] for r in rows)}


def classification_accuracy(gguf_path, tokenizer_dir, spec, rows: list[dict], n_threads: int | None = None,
                            bitnet_cpp=None) -> dict:
    """Accuracy (and macro-F1) of the GGUF in llama.cpp on a classification split, scored as
    ``bitdistill.evaluate`` scores the PyTorch student: the restricted argmax over the label words' first tokens at
    the answer position, the prompt tokenized by the HF tokenizer (the same ids the student saw)."""
    from transformers import AutoTokenizer

    from bitdistill.data import encode_example, label_token_ids
    from bitdistill.evaluate import macro_f1

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    candidates = label_token_ids(tokenizer, spec.label_words)
    classes = len(spec.label_words)
    encoded = [encode_example(tokenizer, spec, r, with_answer=False) for r in rows]
    n_ctx = max(e["prompt_length"] for e in encoded) + 8
    # logits_all: without it llama-cpp-python leaves `scores` unwritten (its sampler reads the logits itself)
    llm = load_llama(gguf_path, n_ctx=n_ctx, n_threads=n_threads, logits_all=True, bitnet_cpp=bitnet_cpp)
    confusion = np.zeros((classes, classes))
    for row, enc in zip(rows, encoded):
        ids = list(map(int, enc["input_ids"][:enc["prompt_length"]]))
        llm.reset()
        llm.eval(ids)
        answer = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float32)[candidates]
        confusion[int(row["label"]), int(answer.argmax())] += 1
    n = max(len(rows), 1)
    return {"accuracy": 100.0 * float(np.trace(confusion)) / n, "macro_f1": macro_f1(confusion.ravel().tolist(),
            classes), "n": len(rows)}


def make_llama_student(out_dir, seed: int = 0, hidden_size: int = 256, intermediate_size: int = 512,
                       num_hidden_layers: int = 2, num_attention_heads: int = 4, num_key_value_heads: int = 2,
                       vocab_size: int = 512, per_channel: bool = False, fp_dir=None, **config_kwargs) -> str:
    """A random Llama-architecture bitdistill student (SubLN, tied embedding) with a byte-level BPE tokenizer,
    saved as bitdistill saves one (save_pretrained + tokenizer); ``fp_dir``: also its FP teacher (latent weights,
    no SubLN). Returns ``out_dir``."""
    import random

    from transformers import AutoModelForCausalLM, LlamaConfig

    from bitdistill.convert import convert_to_bitnet
    from bitdistill.tiny import build_tokenizer, corpus_text

    out = pathlib.Path(out_dir)
    rng = random.Random(seed)
    tokenizer = build_tokenizer([corpus_text(rng) for _ in range(400)], vocab_size)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                         num_key_value_heads=num_key_value_heads, max_position_embeddings=512,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **config_kwargs)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # a wider embedding than the 0.02 init: logits with clear argmaxes
        model.get_input_embeddings().weight.normal_(0.0, 1.0)
    if fp_dir is not None:
        model.save_pretrained(fp_dir)
        tokenizer.save_pretrained(fp_dir)
    convert_to_bitnet(model, subln=True, quantize=True, per_channel=per_channel, backend="torch")
    with torch.no_grad():  # SubLN gains away from 1 so that a wrong mapping shows
        for name, p in model.named_parameters():
            if name.endswith("subln.weight"):
                p.uniform_(0.8, 1.2)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def format_report(r: dict) -> str:
    lines = [f"{r['gguf']}: {len(r['prompts'])} prompts x {r['n_tokens']} tokens"]
    for p in r["prompts"]:
        lines.append(f"  {str(p['prompt'])[:40]!r:44} argmax agree {p['argmax_agree']:.3f}, logits rel err "
                     f"{p['logits_rel_err']:.2e}, own greedy equal {p['greedy_equal_frac']:.3f} (first differing "
                     f"{p['first_differing_token']}), tokenization equal {p['tokenization_equal']}")
    lines.append(f"mean argmax agreement {r['mean_argmax_agree']:.3f}, mean greedy equal {r['mean_greedy_equal_frac']:.3f}, "
                 f"logits rel err mean {r['mean_logits_rel_err']:.2e} / max {r['max_logits_rel_err']:.2e}")
    lines.append(f"with llama.cpp's activation blocks in PyTorch: greedy equal {r['mean_blocks_greedy_equal_frac']:.3f}, "
                 f"logits rel err {r['mean_blocks_logits_rel_err']:.2e} (llama.cpp against it "
                 f"{r['mean_llama_vs_blocks_logits_rel_err']:.2e})")
    return "\n".join(lines)


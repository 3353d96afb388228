"""Deployment benchmark of cpu_ref: packed ternary student vs torch fp32 / bf16 / fp16 (and llama.cpp), this CPU.

    python bench/bench_cpu_ref.py                       # random Qwen3-0.6B-shaped student, 1 and all threads
    python bench/bench_cpu_ref.py --student DIR         # a distilled student (bitdistill save_pretrained dir)
    python bench/bench_cpu_ref.py --preset tiny         # seconds; checks that the harness works
    python bench/bench_cpu_ref.py --preset llama-tiny   # with the llama.cpp rows (needs llama-cpp-python)
    python -m cpu_ref bench ...                         # the same (runs this file)

Prints a table and writes bench/results/cpu_ref-<cpu>-<date>.json (device, date, git commit, every run).

For each variant and thread count a fresh process loads the model, warms up, then times ``--repeat`` greedy runs
(medians reported): prefill of ``--prompt-len`` tokens and ``--decode`` steps at batch 1 (KV cache). Peak RSS is
that process's VmHWM.
Every variant runs the same loop (``--loop``, default the lean decoder of ``cpu_ref.decoder``; ``hf`` for the HF
forward), so the variants differ only in their linear layers, embedding and head. Packed models hold q/k/v and
gate/up stacked (one kernel call each, stored so in the file); baselines keep HF's separate nn.Linear weights as
``from_pretrained`` maps them (``--fuse-baselines`` stacks them too: one matmul each, but a copy of those weights
next to the mapped file, so more resident memory). No environment variable is set for the workers beyond
OMP_NUM_THREADS (libgomp's default wait policy already spins between the back-to-back parallel regions of decode).
Variants: ``packed-i2`` (everything not packed in fp32: the twin of the PyTorch student), ``packed-i2-bf16head``
(the same with the embedding / lm_head table in bf16, float32 arithmetic: the deployment setting), ``torch-fp32``, ``torch-bf16``, ``torch-fp16`` (only where the CPU has
native fp16 arithmetic: avx512_fp16 or amx_fp16). Baselines are the student's architecture as a plain FP model
(its latent weights in nn.Linear, no SubLN), loaded with from_pretrained from a checkpoint of that dtype.
Before timing, the packed model's greedy tokens are compared with the PyTorch student's (bitkernels reference).

llama.cpp rows (llama-cpp-python installed, Llama-architecture student: ``--preset llama-tiny`` / ``smollm2-135m`` /
``smollm2-1.7b`` or such a ``--student``): ``llama-tq2_0`` / ``llama-tq1_0`` (the student exported by
cpu_ref.gguf_export to llama.cpp's bitnet architecture, embedding in Q8_0) and ``llama-teacher-f16`` /
``llama-teacher-q8_0`` (the FP baseline as llama.cpp's llama architecture). The same prompt and greedy loop (one
``eval`` of the prompt, then one token a step, argmax in numpy); threads through llama.cpp's n_threads. Without
llama-cpp-python, or for a student llama.cpp cannot represent, those rows say why. The TQ2_0 file is also compared
with the PyTorch student (cpu_ref.gguf_check: greedy agreement, logits relative error).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import pathlib
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PRESETS = {
    # Qwen3-0.6B's shapes (hidden 1024, 28 layers, 16 q / 8 kv heads of 128, MLP 3072, vocab 151936, tied).
    "qwen3-0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                       rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True),
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, max_position_embeddings=512, tie_word_embeddings=True),
    # Llama-architecture presets (llama.cpp's bitnet graph can run these students)
    "llama-tiny": dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
                       tie_word_embeddings=True),
    # SmolLM2-135M's shapes: hidden 576 is not a multiple of 256, so only ffn_down is TQ (the rest Q8_0, see the file)
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True),
    "smollm2-1.7b": dict(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, rope_theta=130000.0, tie_word_embeddings=True),
}
LLAMA_VARIANTS = ("llama-tq2_0", "llama-tq1_0", "llama-teacher-f16", "llama-teacher-q8_0")
VARIANTS = ("packed-i2", "packed-i2-bf16head", "torch-fp32", "torch-bf16", "torch-fp16") + LLAMA_VARIANTS


def cpu_flags() -> set[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def all_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _random_student(preset: str, seed: int):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    from bitdistill.convert import convert_to_bitnet

    torch.manual_seed(seed)
    config_cls = LlamaConfig if preset.startswith(("llama", "smollm")) else Qwen3Config
    model = AutoModelForCausalLM.from_config(config_cls(**PRESETS[preset]), dtype=torch.float32).eval()
    convert_to_bitnet(model, subln=True, quantize=True, backend="torch")
    with torch.no_grad():  # SubLN gains away from 1 so that the test sees them
        for name, p in model.named_parameters():
            if name.endswith("subln.weight"):
                p.uniform_(0.8, 1.2)
    return model


def _save_fp_baseline(student, out: pathlib.Path, dtype: torch.dtype) -> None:
    """The student's architecture as a plain FP HF checkpoint (latent weights, no SubLN, no conversion record)."""
    from safetensors.torch import save_file

    config = student.config.to_dict()
    config.pop("bitdistill", None)
    config["dtype"] = str(dtype).removeprefix("torch.")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    state, seen = {}, set()
    for k, v in student.state_dict().items():
        if ".subln." in k or v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        state[k] = v.detach().to(dtype).contiguous()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})


def prepare(args, work: pathlib.Path) -> dict:
    """Build (or load) the student, write the packed and baseline checkpoints, check greedy equality."""
    from cpu_ref import linear_weight_bytes, load_packed, save_packed
    from cpu_ref.runner import greedy_generate

    t0 = time.perf_counter()
    if args.student:
        from bitdistill.convert import load_student

        student = load_student(args.student, backend="torch", dtype=torch.float32)
        source = str(args.student)
    else:
        student = _random_student(args.preset, args.seed)
        source = f"random {args.preset} (seed {args.seed})"
    info = {"source": source, "n_params": sum(p.numel() for p in student.parameters())}
    save_packed(student, work / "packed-i2", "i2", torch.float32, tokenizer_dir=args.student)
    save_packed(student, work / "packed-i2-bf16head", "i2", torch.float32, tokenizer_dir=args.student,
                head_dtype=torch.bfloat16)
    save_packed(student, work / "packed-tq1", "tq1", torch.float32, tokenizer_dir=args.student)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if f"torch-{name}" in args.variants:
            _save_fp_baseline(student, work / f"torch-{name}", dtype)
    packed = load_packed(work / "packed-i2")
    lin = linear_weight_bytes(packed)
    tq1_file = (work / "packed-tq1" / "cpu_ref.safetensors")
    from safetensors import safe_open

    with safe_open(str(tq1_file), framework="pt") as f:
        numel = {k: int(torch.Size(f.get_slice(k).get_shape()).numel()) for k in f.keys()}
    tq1_linear = sum(n for k, n in numel.items() if k.endswith(".qweight"))
    tq1_linear += sum(4 * n for k, n in numel.items() if k.endswith(".weight_scale"))
    info["weight_bytes"] = {
        "linear_fp16": lin["fp16"], "linear_fp32": lin["fp32"], "linear_i2": lin["i2"], "linear_tq1": tq1_linear,
        "ratio_fp16_over_i2": lin["fp16"] / lin["i2"], "ratio_fp16_over_tq1": lin["fp16"] / tq1_linear,
        "file_packed_i2": (work / "packed-i2" / "cpu_ref.safetensors").stat().st_size,
        "file_packed_i2_bf16head": (work / "packed-i2-bf16head" / "cpu_ref.safetensors").stat().st_size,
        "file_packed_tq1": tq1_file.stat().st_size,
        **{f"file_torch_{n}": (work / f"torch-{n}" / "model.safetensors").stat().st_size
           for n in ("fp32", "bf16", "fp16") if (work / f"torch-{n}").is_dir()},
    }
    # Greedy decode on a fixed prompt: the packed model against (1) its exact integer twin in torch (must be equal,
    # logits bit for bit) and (2) the PyTorch student (fake-quantized float32 matmuls: equal up to float rounding
    # moving an int8 code; on a near-tie argmax the tokens can part, so we report where and by what margin).
    from cpu_ref.reference import exact_reference

    g = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(0, student.config.vocab_size, (1, args.check_prompt_len), generator=g)
    got = greedy_generate(packed, prompt, args.check_tokens, loop=args.loop)["tokens"]
    exact = exact_reference(student)
    with torch.inference_mode():  # the HF forward on all positions (torch's matmul head in both)
        exact_logits_equal = bool(torch.equal(exact(input_ids=got).logits, packed(input_ids=got).logits))
    # The decode loop's head is the packed model's KernelHead: the twin gets the same one, so every step's logits
    # can be compared bit for bit too.
    exact.set_output_embeddings(packed.get_output_embeddings())
    exact_tokens = greedy_generate(exact, prompt, args.check_tokens, loop=args.loop)["tokens"]
    exact_logits_equal = exact_logits_equal and _stepwise_equal(packed, exact, got, args.check_prompt_len, args.loop)
    del exact
    ref = greedy_generate(student, prompt, args.check_tokens, loop=args.loop)["tokens"]
    with torch.inference_mode():
        lr, lp = student(input_ids=ref).logits, packed(input_ids=ref).logits
    differ = (ref[0] != got[0]).nonzero()
    first = int(differ[0]) if len(differ) else None
    margin = None
    if first is not None:
        top2 = lr[0, first - 1].float().topk(2).values
        margin = float(top2[0] - top2[1])
    info["check"] = {"prompt_len": args.check_prompt_len, "new_tokens": args.check_tokens,
                     "greedy_equal_exact_int_reference": bool(torch.equal(exact_tokens, got)),
                     "logits_equal_exact_int_reference": exact_logits_equal,
                     "greedy_equal": bool(torch.equal(ref, got)),
                     "first_differing_new_token": None if first is None else first - args.check_prompt_len,
                     "student_top2_margin_there": margin,
                     "logits_max_abs_diff": float((lr - lp).abs().max()), "logits_max_abs": float(lr.abs().max())}
    if any(v in LLAMA_VARIANTS for v in args.variants.split(",")):
        info["llama_cpp"] = _prepare_llama(args, work, student, prompt)
    info["prepare_s"] = time.perf_counter() - t0
    del student, packed
    return info


def _prepare_llama(args, work: pathlib.Path, student, prompt: torch.Tensor) -> dict:
    """Export the GGUFs of the llama.cpp rows; compare the TQ2_0 file with the student. Problems are recorded
    (the rows then fail with the reason), never raised."""
    from cpu_ref.gguf_check import compare, llama_cpp_available
    from cpu_ref.gguf_export import GGUFExportError, export_gguf

    ok, version = llama_cpp_available()
    out = {"llama_cpp_python": version if ok else None}
    if not ok:
        out["error"] = version
        return out
    student_dir = pathlib.Path(args.student) if args.student else work / "student"
    if not args.student:
        student.save_pretrained(student_dir)
    has_tok = (student_dir / "tokenizer.json").is_file()
    vocab = "tokenizer" if has_tok else "placeholder"
    teacher_dir = work / "torch-fp32"
    if not teacher_dir.is_dir():
        _save_fp_baseline(student, teacher_dir, torch.float32)
    if has_tok:
        from cpu_ref.model import TOKENIZER_FILES

        for name in TOKENIZER_FILES:
            if (student_dir / name).is_file():
                shutil.copy(student_dir / name, teacher_dir / name)
    out["files"], out["export_notes"], out["errors"] = {}, {}, {}
    for v in args.variants.split(","):
        if v not in LLAMA_VARIANTS:
            continue
        kind = v.rsplit("-", 1)[-1]
        src = teacher_dir if "teacher" in v else student_dir
        try:
            r = export_gguf(src, work / f"{v}.gguf", kind, embed="q8_0", vocab=vocab)
        except GGUFExportError as exc:
            out["errors"][v] = str(exc)
            continue
        out["files"][v] = r["bytes"]
        if r.get("fallbacks"):
            out["export_notes"][v] = r["fallbacks"]
    if "llama-tq2_0" in out["files"]:
        r = compare(student_dir, work / "llama-tq2_0.gguf", n_tokens=args.check_tokens, model=student,
                    prompt_ids=[prompt[0].tolist()])
        out["check_tq2_0"] = {k: r[k] for k in ("mean_argmax_agree", "mean_greedy_equal_frac", "max_logits_rel_err")}
    return out


def _stepwise_equal(a, b, tokens: torch.Tensor, prompt_len: int, loop: str) -> bool:
    """The decode loop's logits of ``a`` and ``b`` equal bit for bit at the prompt and at every following token."""
    from cpu_ref.runner import make_decoder

    da, db = make_decoder(a, tokens.shape[1], loop), make_decoder(b, tokens.shape[1], loop)
    if da is None or db is None:  # the HF loop: covered by the full-forward comparison
        return True
    if not torch.equal(da(tokens[:, :prompt_len]), db(tokens[:, :prompt_len])):
        return False
    return all(torch.equal(da(tokens[:, j:j + 1]), db(tokens[:, j:j + 1]))
               for j in range(prompt_len, tokens.shape[1]))


def _stacked_groups(model) -> int:
    from bitdistill.hf_layout import any_decoder_layers
    from cpu_ref.fuse import projection_groups, stacked_rows

    layers = any_decoder_layers(model)
    return sum(stacked_rows([getattr(p, "qweight", getattr(p, "weight", None)) for p in parts]) is not None
               for layer in (layers if layers is not None else []) for parts in projection_groups(layer))


def worker(variant: str, model_dir: str, threads: int, prompt_len: int, decode: int, seed: int,
           loop: str = "auto", fuse_baselines: bool = False, repeat: int = 1) -> dict:
    """One fresh process: load, warm up, time prefill + decode (``repeat`` times: medians), report peak RSS."""
    from cpu_ref.fuse import fuse_projections

    torch.set_num_threads(threads)
    if variant in LLAMA_VARIANTS:
        return llama_worker(variant, model_dir, threads, prompt_len, decode, seed, repeat)
    t0 = time.perf_counter()
    if variant.startswith("packed"):
        from cpu_ref import load_packed

        model = load_packed(model_dir, n_threads=threads,
                            head_dtype=torch.bfloat16 if variant.endswith("bf16head") else None)
    else:
        from transformers import AutoModelForCausalLM

        dtype = {"torch-fp32": torch.float32, "torch-bf16": torch.bfloat16, "torch-fp16": torch.float16}[variant]
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    if variant.startswith("packed") or fuse_baselines:  # packed: stacked at load already, this only counts them
        fuse_projections(model)
    stacked = _stacked_groups(model)
    load_s = time.perf_counter() - t0
    from cpu_ref.runner import greedy_generate

    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    greedy_generate(model, torch.randint(0, vocab, (1, 8), generator=g), 3, loop=loop)  # warm-up: kernel, allocator
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=g)
    runs = [greedy_generate(model, prompt, decode + 1, loop=loop) for _ in range(max(1, repeat))]
    r = sorted(runs, key=lambda x: x["decode_s"])[len(runs) // 2]  # the median run by decode time
    prefill_s = sorted(x["prefill_s"] for x in runs)[len(runs) // 2]
    return {"variant": variant, "threads": threads, "load_s": load_s, "loop": r["loop"], "stacked_groups": stacked,
            "prefill_tok_s": prompt_len / prefill_s, "decode_tok_s": r["decode_steps"] / r["decode_s"],
            "prefill_s": prefill_s, "decode_s": r["decode_s"], "decode_steps": r["decode_steps"],
            "decode_tok_s_runs": [x["decode_steps"] / x["decode_s"] for x in runs],
            "peak_rss_bytes": peak_rss_bytes()}


def llama_worker(variant: str, gguf_path: str, threads: int, prompt_len: int, decode: int, seed: int,
                 repeat: int = 1) -> dict:
    """The worker of a llama.cpp row: the same prompt, prefill and greedy decode steps as the other rows."""
    import numpy as np

    from cpu_ref.gguf_check import load_llama

    t0 = time.perf_counter()
    llm = load_llama(gguf_path, n_ctx=prompt_len + decode + 16, n_threads=threads, logits_all=False)
    load_s = time.perf_counter() - t0
    vocab = llm.n_vocab()
    g = torch.Generator().manual_seed(seed)
    warm = torch.randint(0, vocab, (1, 8), generator=g)[0].tolist()
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=g)[0].tolist()

    def run(ids, steps):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(steps):
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        return {"prefill_s": prefill, "decode_s": time.perf_counter() - t, "decode_steps": steps}

    run(warm, 3)
    runs = [run(prompt, decode) for _ in range(max(1, repeat))]
    r = sorted(runs, key=lambda x: x["decode_s"])[len(runs) // 2]
    prefill_s = sorted(x["prefill_s"] for x in runs)[len(runs) // 2]
    return {"variant": variant, "threads": threads, "load_s": load_s, "loop": "llama.cpp", "stacked_groups": 0,
            "prefill_tok_s": prompt_len / prefill_s, "decode_tok_s": r["decode_steps"] / r["decode_s"],
            "prefill_s": prefill_s, "decode_s": r["decode_s"], "decode_steps": r["decode_steps"],
            "decode_tok_s_runs": [x["decode_steps"] / x["decode_s"] for x in runs],
            "file_bytes": os.path.getsize(gguf_path), "peak_rss_bytes": peak_rss_bytes()}


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries that across fork + exec, so a worker
    started by a big parent would report the parent's size."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _run_worker(variant, model_dir, threads, args) -> dict:
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", variant, "--model-dir", str(model_dir),
           "--threads", str(threads), "--prompt-len", str(args.prompt_len), "--decode", str(args.decode),
           "--seed", str(args.seed), "--loop", args.loop, "--repeat", str(args.repeat)] + \
        (["--fuse-baselines"] if args.fuse_baselines else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"variant": variant, "threads": threads, "error": proc.stderr.strip().splitlines()[-1][:300]
                if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _file_bytes(result: dict, r: dict) -> int | None:
    if "file_bytes" in r:
        return r["file_bytes"]
    key = "file_" + r["variant"].replace("-", "_")
    return result["prepare"]["weight_bytes"].get(key)


def format_table(result: dict) -> str:
    rows = result["runs"]
    base = {(r["variant"], r["threads"]): r for r in rows if "error" not in r}
    lines = [f"{'variant':<19} {'thr':>3} {'prefill tok/s':>13} {'decode tok/s':>12} {'x fp32 dec':>10} "
             f"{'x fp32 pre':>10} {'file MiB':>8} {'peak RSS MiB':>12}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['variant']:<19} {r['threads']:>3} FAILED: {r['error'][:160]}")
            continue
        f = base.get(("torch-fp32", r["threads"]))
        xd = f"{r['decode_tok_s'] / f['decode_tok_s']:.2f}" if f else "-"
        xp = f"{r['prefill_tok_s'] / f['prefill_tok_s']:.2f}" if f else "-"
        fb = _file_bytes(result, r)
        fm = f"{fb / 2**20:.2f}" if fb else "-"
        lines.append(f"{r['variant']:<19} {r['threads']:>3} {r['prefill_tok_s']:>13.1f} {r['decode_tok_s']:>12.2f} "
                     f"{xd:>10} {xp:>10} {fm:>8} {r['peak_rss_bytes'] / 2**20:>12.0f}")
    loops = sorted({f"{r['variant']}: {r.get('loop')}, {r.get('stacked_groups')} stacked groups" for r in rows
                    if "error" not in r})
    lines.append("decode loop / stacked q|k|v, gate|up groups: " + "; ".join(loops))
    wb = result["prepare"]["weight_bytes"]
    lines.append(f"linear weights: fp16 {wb['linear_fp16'] / 2**20:.1f} MiB, i2 {wb['linear_i2'] / 2**20:.1f} MiB "
                 f"(fp16/i2 = {wb['ratio_fp16_over_i2']:.3f}), tq1 {wb['linear_tq1'] / 2**20:.1f} MiB "
                 f"(fp16/tq1 = {wb['ratio_fp16_over_tq1']:.3f})")
    c = result["prepare"]["check"]
    lines.append(f"exact integer reference: greedy tokens equal {c['greedy_equal_exact_int_reference']}, logits bit "
                 f"for bit {c['logits_equal_exact_int_reference']} ({c['new_tokens']} new tokens)")
    lines.append(f"PyTorch student: greedy tokens equal {c['greedy_equal']}"
                 + ("" if c["greedy_equal"] else f" (first differing new token {c['first_differing_new_token']}, "
                    f"student top-2 margin there {c['student_top2_margin_there']:.2e})")
                 + f"; logits max |diff| {c['logits_max_abs_diff']:.2e} (max |logit| {c['logits_max_abs']:.2f})")
    lc = result["prepare"].get("llama_cpp")
    if lc:
        if lc.get("check_tq2_0"):
            k = lc["check_tq2_0"]
            lines.append(f"llama.cpp TQ2_0 vs PyTorch student (llama-cpp-python {lc['llama_cpp_python']}): argmax "
                         f"agreement {k['mean_argmax_agree']:.3f}, own greedy tokens equal "
                         f"{k['mean_greedy_equal_frac']:.3f}, logits rel err {k['max_logits_rel_err']:.2e}")
        for v, notes in lc.get("export_notes", {}).items():
            lines.append(f"{v}: {len(notes)} tensors stored as Q8_0 (rows not a multiple of 256), e.g. {notes[0]}")
    return "\n".join(lines)


def _git() -> dict:
    try:
        from bench.harness import git_provenance

        return git_provenance()
    except Exception as exc:  # no git, or bench/ not beside cpu_ref/
        return {"git_commit": "unknown", "git_error": str(exc)[:200]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default=None, help="a bitdistill student directory (default: a random preset)")
    p.add_argument("--preset", default="qwen3-0.6b", choices=sorted(PRESETS))
    p.add_argument("--threads", default="1,all", help="comma list of thread counts; 'all' = every usable core")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--decode", type=int, default=16, help="decode steps timed after the prefill")
    p.add_argument("--repeat", type=int, default=1, help="timed runs per worker (the table shows medians)")
    p.add_argument("--check-prompt-len", type=int, default=16)
    p.add_argument("--check-tokens", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loop", default="auto", choices=["auto", "lean", "hf"],
                   help="decode loop of every variant: lean (cpu_ref.decoder) where supported, or the HF forward")
    p.add_argument("--fuse-baselines", action="store_true",
                   help="stack the baselines' q/k/v and gate/up weights too (one matmul each; costs resident memory)")
    p.add_argument("--workdir", default=None, help="where checkpoints go (default: a temporary folder)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/cpu_ref-<cpu>-<date>.json)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args.worker, args.model_dir, int(args.threads), args.prompt_len, args.decode,
                                args.seed, args.loop, args.fuse_baselines, args.repeat)))
        return 0

    from cpu_ref import _build

    flags = cpu_flags()
    fp16_native = bool({"avx512_fp16", "amx_fp16"} & flags)
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variants {bad}; choose among {VARIANTS}")
    if "torch-fp16" in variants and not fp16_native:
        variants.remove("torch-fp16")
    args.variants = ",".join(variants)
    n_all = all_threads()
    threads = sorted({n_all if t == "all" else int(t) for t in args.threads.split(",")})
    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_name(),
            "threads_available": n_all, "kernel_isa": _build.isa(),
            "openmp_runtimes": _build.openmp_runtimes(), "torch": torch.__version__,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "fp16_native": fp16_native,
            "avx512_vnni": "avx512_vnni" in flags, "amx": "amx_tile" in flags,
            "prompt_len": args.prompt_len, "decode_steps": args.decode, "repeat": args.repeat, "loop": args.loop,
            "fuse_baselines": args.fuse_baselines, **_git(),
            "omp_env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_", "KMP_", "MKL_"))}}
    print(json.dumps(meta), flush=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = pathlib.Path(tmp)
        info = prepare(args, work)
        print(json.dumps(info), flush=True)
        runs = []
        for t in threads:
            for v in variants:
                if v in LLAMA_VARIANTS and not (work / f"{v}.gguf").is_file():
                    why = info.get("llama_cpp", {})
                    r = {"variant": v, "threads": t,
                         "error": why.get("errors", {}).get(v) or why.get("error") or "no GGUF exported"}
                else:
                    r = _run_worker(v, work / (f"{v}.gguf" if v in LLAMA_VARIANTS else v), t, args)
                runs.append(r)
                print(json.dumps(r), flush=True)
    result = {"meta": meta, "prepare": info, "runs": runs}
    slug = re.sub(r"[^A-Za-z0-9]+", "-", meta["cpu"]).strip("-").lower()[:40]
    out = pathlib.Path(args.out) if args.out else (
        ROOT / "bench" / "results" / f"cpu_ref-{slug}-{meta['date'][:10]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}\n")
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

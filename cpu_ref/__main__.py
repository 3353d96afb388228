"""python -m cpu_ref {pack, generate, classify, bench, export-gguf, check-gguf, classify-gguf}

    python -m cpu_ref pack STUDENT_DIR OUT_DIR [--packing i2|tq1]     # a bitdistill student -> packed directory
    python -m cpu_ref generate OUT_DIR --prompt "text" [--max-new-tokens 32] [--check STUDENT_DIR]
    python -m cpu_ref classify OUT_DIR --prompt "text" --labels yes,no   # or --ids 1,2 --label-ids 3,4
    python -m cpu_ref bench [--student STUDENT_DIR] [--preset qwen3-0.6b]   # bench/bench_cpu_ref.py
    python -m cpu_ref export-gguf STUDENT_DIR out.gguf --type tq2_0|tq1_0|i2_s [--embed q8_0|f16|f32] [--strict]
    python -m cpu_ref export-gguf FP_LLAMA_DIR out.gguf --type f16|q8_0|f32       # see cpu_ref/gguf_export.py
    python -m cpu_ref check-gguf STUDENT_DIR out.gguf [--prompts "a" "b"] [--tokens 32]  # needs llama-cpp-python
    python -m cpu_ref classify-gguf out.gguf STUDENT_DIR --config CONFIG [--limit N]      # task accuracy in llama.cpp
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch


def _tokenizer(path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise SystemExit(f"{path}: no usable tokenizer ({exc}); pack with the student directory that has one, "
                         "or pass token ids with --ids") from exc


def _prompt_ids(args):
    if args.ids:
        return torch.tensor([[int(t) for t in args.ids.split(",")]])
    if args.prompt is None:
        raise SystemExit("give --prompt TEXT or --ids 1,2,3")
    return _tokenizer(args.model).encode(args.prompt, return_tensors="pt")


def _require_llama_cpp(cmd: str) -> None:
    from .gguf_check import llama_cpp_available

    ok, why = llama_cpp_available()
    if not ok:
        raise SystemExit(f"{cmd}: {why} (pip install llama-cpp-python)")


def _bench(argv) -> int:
    """The benchmark lives in the repository's bench/ (it is no part of the package)."""
    import importlib.util

    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "bench_cpu_ref.py"
    if not path.is_file():
        raise SystemExit(f"python -m cpu_ref bench runs {path}, which is not here: run it from a checkout")
    spec = importlib.util.spec_from_file_location("bench_cpu_ref", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(argv)


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "bench":
        return _bench(argv[1:])
    p = argparse.ArgumentParser(prog="python -m cpu_ref", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("pack", help="pack a bitdistill student directory")
    pk.add_argument("student")
    pk.add_argument("out")
    pk.add_argument("--packing", default="i2", choices=["i2", "tq1"])
    pk.add_argument("--float-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    for name in ("generate", "classify"):
        s = sub.add_parser(name)
        s.add_argument("model", help="a packed directory")
        s.add_argument("--prompt", default=None)
        s.add_argument("--ids", default=None, help="comma-separated token ids instead of --prompt")
        s.add_argument("--threads", type=int, default=None)
        s.add_argument("--float-dtype", default="float32", choices=["float32", "bfloat16"])
        if name == "generate":
            s.add_argument("--max-new-tokens", type=int, default=32)
            s.add_argument("--check", default=None, help="student directory: assert the same greedy tokens")
        else:
            s.add_argument("--labels", default=None, help="comma-separated label words (needs the tokenizer)")
            s.add_argument("--label-ids", default=None, help="comma-separated label token ids instead of --labels")
    sub.add_parser("bench", help="measurement (runs bench/bench_cpu_ref.py)")
    ex = sub.add_parser("export-gguf", help="a student (or FP Llama) -> GGUF for llama.cpp (cpu_ref/gguf_export.py)")
    ex.add_argument("model")
    ex.add_argument("out")
    ex.add_argument("--type", default="tq2_0", choices=["tq2_0", "tq1_0", "i2_s", "f16", "q8_0", "f32"],
                    help="i2_s: for bitnet.cpp (microsoft/BitNet), not stock llama.cpp")
    ex.add_argument("--embed", default="q8_0", choices=["q8_0", "f16", "f32"], help="token embedding / head type")
    ex.add_argument("--strict", action="store_true", help="refuse rows that are not a multiple of 256 (i2_s: "
                    "128) instead of storing them as Q8_0")
    ex.add_argument("--tokenizer-pre", default=None, help="llama.cpp pre-tokenizer name (default: detected)")
    ck = sub.add_parser("check-gguf", help="llama.cpp (llama-cpp-python) vs the PyTorch student")
    ck.add_argument("student")
    ck.add_argument("gguf")
    ck.add_argument("--prompts", nargs="+", default=None)
    ck.add_argument("--tokens", type=int, default=32)
    ck.add_argument("--threads", type=int, default=None)
    ck.add_argument("--json", default=None, help="also write the report here")
    ck.add_argument("--bitnet-cpp", default=None, metavar="DIR", help="run the file in this built bitnet.cpp "
                    "checkout (an I2_S file) instead of llama-cpp-python")
    cl = sub.add_parser("classify-gguf", help="accuracy of a GGUF in llama.cpp on a bitdistill config's eval split")
    cl.add_argument("gguf")
    cl.add_argument("tokenizer", help="directory of the student's HF tokenizer (the student directory)")
    cl.add_argument("--config", required=True, help="bitdistill config whose task (classification) is scored")
    cl.add_argument("--limit", type=int, default=None, help="only the first N eval rows")
    cl.add_argument("--threads", type=int, default=None)
    cl.add_argument("--json", default=None, help="also write the result here")
    cl.add_argument("--bitnet-cpp", default=None, metavar="DIR", help="as check-gguf's")
    args = p.parse_args(argv)

    if args.cmd == "export-gguf":
        from .gguf_export import GGUFExportError, export_gguf

        try:
            r = export_gguf(args.model, args.out, args.type, args.embed, args.strict, args.tokenizer_pre)
        except GGUFExportError as exc:
            raise SystemExit(f"export-gguf: {exc}") from exc
        print(f"wrote {r['out']} ({r['arch']}, {r['type']}, {r['bytes']} bytes)")
        for note in r.get("fallbacks", []):
            print(f"  {note}", file=sys.stderr)
        return 0
    if args.cmd == "check-gguf":
        import json

        from .gguf_check import DEFAULT_PROMPTS, compare, format_report

        if args.bitnet_cpp is None:
            _require_llama_cpp(args.cmd)
        r = compare(args.student, args.gguf, tuple(args.prompts or DEFAULT_PROMPTS), args.tokens, args.threads,
                    bitnet_cpp=args.bitnet_cpp)
        print(format_report(r))
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps(r, indent=1))
        return 0

    if args.cmd == "classify-gguf":
        import json

        from bitdistill.config import parse_config, read_config
        from bitdistill.data import DataError, load_task_split

        from .gguf_check import classification_accuracy

        if args.bitnet_cpp is None:
            _require_llama_cpp(args.cmd)
        if not pathlib.Path(args.gguf).is_file():
            raise SystemExit(f"classify-gguf: {args.gguf} does not exist (write it with export-gguf)")
        try:
            spec = parse_config(read_config(args.config)).task
            if spec.type != "classification":
                raise SystemExit(f"classify-gguf: {args.config} has a {spec.type} task; only classification is scored")
            rows = load_task_split(spec, "eval")[:args.limit]
        except (FileNotFoundError, DataError, ValueError) as exc:
            raise SystemExit(f"classify-gguf: {exc}") from exc
        r = classification_accuracy(args.gguf, args.tokenizer, spec, rows, args.threads, args.bitnet_cpp)
        print(json.dumps(r))
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps(r, indent=1))
        return 0

    from . import load_packed, save_packed

    if args.cmd == "pack":
        from bitdistill.convert import load_student

        student = load_student(args.student, backend="torch", dtype=torch.float32)
        out = save_packed(student, args.out, args.packing, getattr(torch, args.float_dtype), tokenizer_dir=args.student)
        print(f"wrote {out}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_packed(args.model, n_threads=args.threads, float_dtype=getattr(torch, args.float_dtype))
    ids = _prompt_ids(args)
    from .runner import classify, greedy_generate

    if args.cmd == "generate":
        r = greedy_generate(model, ids, args.max_new_tokens, getattr(model.config, "eos_token_id", None))
        new = r["tokens"][0, ids.shape[1]:].tolist()
        text = _tokenizer(args.model).decode(new) if args.prompt is not None else new
        print(text)
        print(f"prefill {r['prompt_len'] / r['prefill_s']:.1f} tok/s, decode "
              f"{r['decode_steps'] / max(r['decode_s'], 1e-9):.2f} tok/s", file=sys.stderr)
        if args.check:
            from bitdistill.convert import load_student

            ref = greedy_generate(load_student(args.check, backend="torch", dtype=torch.float32), ids,
                                  args.max_new_tokens, getattr(model.config, "eos_token_id", None))["tokens"]
            same = torch.equal(ref, r["tokens"])
            print(f"same greedy tokens as the PyTorch student: {same}", file=sys.stderr)
            return 0 if same else 1
        return 0
    if args.label_ids:
        label_ids = [int(t) for t in args.label_ids.split(",")]
        labels = [str(t) for t in label_ids]
    elif args.labels:
        from bitdistill.data import label_token_ids

        labels = args.labels.split(",")
        label_ids = label_token_ids(_tokenizer(args.model), labels)
    else:
        raise SystemExit("give --labels word1,word2 or --label-ids 11,12")
    t0 = time.perf_counter()
    pred, logits = classify(model, [ids[0]], label_ids)
    print(labels[pred[0]])
    print(f"label logits {logits[0].tolist()} ({time.perf_counter() - t0:.3f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

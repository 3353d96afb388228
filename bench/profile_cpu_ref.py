"""Where a packed decode step's time goes: each call of the lean decode loop timed in place, per token.

    python bench/profile_cpu_ref.py --threads 16 [--preset qwen3-0.6b] [--tokens 24]

A random student of the preset, packed (2-bit, bf16 embedding / head: the deployment variant), run by
``cpu_ref.decoder.LeanDecoder``: per token, the milliseconds and calls of each product (q|k|v, o_proj, gate|up,
down; direct kernel calls, or with ``--modules`` through the modules), C layer op, the head and the embedding, and
what is left outside them (the Python loop). The timers add about
a microsecond a call: compare the instrumented total with the uninstrumented time printed next to it.
"""
from __future__ import annotations

import argparse
import collections
import pathlib
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from cpu_ref import load_packed, save_packed  # noqa: E402
from cpu_ref.decoder import LeanDecoder  # noqa: E402
from bench.bench_cpu_ref import PRESETS, _random_student  # noqa: E402

LAYER_OPS = ("tk_add_rmsnorm", "tk_attn_decode", "tk_swiglu")
PRODUCTS = ("qkv", "o_proj", "gate_up", "down")


def ms_per_token(decoder: LeanDecoder, tokens: int, on_start=None) -> float:
    decoder.reset()
    with torch.inference_mode():
        decoder(torch.randint(0, 1000, (1, 64)))
        token = torch.tensor([[7]])
        for _ in range(4):
            decoder(token)
        if on_start is not None:
            on_start()
        t = time.perf_counter()
        for _ in range(tokens):
            decoder(token)
    return (time.perf_counter() - t) / tokens * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--preset", default="qwen3-0.6b", choices=sorted(PRESETS))
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--modules", action="store_true", help="products through their modules, not the direct calls")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        save_packed(_random_student(args.preset, 0), pathlib.Path(tmp), "i2", torch.float32, head_dtype=torch.bfloat16)
        model = load_packed(tmp, n_threads=args.threads, head_dtype=torch.bfloat16)
    decoder = LeanDecoder(model, 64 + 8 + args.tokens, direct=not args.modules)
    if not decoder.fast:
        raise SystemExit("the one-token C path is not available here (needs an AVX-512 or AVX2 build): nothing to profile")
    plain = ms_per_token(decoder, args.tokens)

    spent, calls = collections.defaultdict(float), collections.defaultdict(int)

    def timed(name, fn):
        def call(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            spent[name] += time.perf_counter() - t
            calls[name] += 1
            return out
        return call

    lib = decoder._lib
    for name in LAYER_OPS:
        setattr(lib, name, timed(name, getattr(lib, name)))
    for layer in decoder.layers:
        if decoder.direct:
            layer.products = [timed(name, p) for name, p in zip(PRODUCTS, layer.products)]
        else:
            for name in PRODUCTS:
                setattr(layer, name, timed(name, getattr(layer, name)))
    decoder.head, decoder.embed = timed("head", decoder.head), timed("embed", decoder.embed)
    total = ms_per_token(decoder, args.tokens, on_start=lambda: (spent.clear(), calls.clear()))
    for name in LAYER_OPS:
        delattr(lib, name)  # back to the plain symbols
    timed_ms = sum(spent.values()) / args.tokens * 1e3
    print(f"{args.preset}, {args.threads} threads, {'direct' if decoder.direct else 'module'} products: "
          f"{plain:.2f} ms/token ({total:.2f} instrumented: calls "
          f"{timed_ms:.2f}, Python loop outside them {total - timed_ms:.2f})")
    for name, s in sorted(spent.items(), key=lambda kv: -kv[1]):
        n = calls[name]
        print(f"  {name:16s} {s / args.tokens * 1e3:7.3f} ms/token  {n // args.tokens:4d} calls  "
              f"{s / max(n, 1) * 1e6:8.1f} us/call")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Training-step throughput and peak memory of every BitDistill stage on a Qwen3-0.6B-shaped model (random init),
fused bitkernels path (Triton: BitLinear, fused logits KD, flash-style attention relations) and the PyTorch
reference path side by side in one process.

    python bench/bench_pipeline.py [--batch 8 --seq 512 --steps 5] [--out bench/results]

Each stage runs the step the trainer runs (bf16 autocast over fp32 master weights, AdamW, grad clipping; the
distill teacher frozen in bf16), through the same loss functions (bitdistill.losses), with no `datasets` import:
batches are random token ids. Correctness first: the fused and reference distill losses and gradients on one
batch must agree. tokens/s counts the tokens of a step (batch x seq) over its median time; peak memory is
torch.cuda.max_memory_allocated over the timed steps (weights and optimizer state included).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bitdistill.convert import convert_to_bitnet, set_backend  # noqa: E402
from bitdistill.data import IGNORE_INDEX  # noqa: E402
from bitdistill.losses import DistillConfig, bitdistill_loss, causal_lm_loss  # noqa: E402

QWEN3_06B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                 rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True)
PATHS = {"fused": None, "reference": "torch"}  # backend argument of bitkernels


def build(seed: int, dtype=torch.float32, layers: int | None = None):
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = dict(QWEN3_06B)
    if layers:
        cfg["num_hidden_layers"] = layers
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(Qwen3Config(**cfg), dtype=dtype)
    return model


def make_batch(batch: int, seq: int, vocab: int, answer_fraction: float | None, seed: int = 0) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), device="cuda", generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    if answer_fraction is not None:  # task stages: loss on the answer (the last tokens) only
        labels[:, : int(seq * (1 - answer_fraction))] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def step_fn(model, loss_fn, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), fused=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model, batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def measure(step, warmup: int, steps: int) -> dict:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return {"ms": statistics.median(times), "ms_all": times, "peak_bytes": torch.cuda.max_memory_allocated(),
            "last_loss": float(loss)}


def free():
    gc.collect()
    torch.cuda.empty_cache()


def check_distill(args, dcfg) -> dict:
    """Fused vs reference Stage-3 loss and student gradients on one batch (same models, same data)."""
    teacher = build(0, torch.bfloat16, layers=args.check_layers).eval().requires_grad_(False)
    student = convert_to_bitnet(build(1, layers=args.check_layers))
    batch = make_batch(2, 256, QWEN3_06B["vocab_size"], args.answer_fraction, seed=5)
    out = {}
    for path, backend in PATHS.items():
        set_backend(student, backend)
        student.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            parts = bitdistill_loss(student, teacher, batch, dcfg, backend=backend, loss_dtype=torch.bfloat16)
        parts["loss"].backward()
        out[path] = {"parts": {k: float(v.detach()) for k, v in parts.items()},
                     "grads": {n: p.grad.float().clone() for n, p in student.named_parameters()
                               if p.grad is not None and ("lm_head" in n or "embed" in n or "layers.0.self_attn.q_proj"
                                                          in n or "layers.0.mlp.down_proj" in n)}}
    report = {}
    for k, v in out["reference"]["parts"].items():
        report[f"{k}_rel_diff"] = abs(out["fused"]["parts"][k] - v) / max(abs(v), 1e-12)
    for n, g in out["reference"]["grads"].items():
        report[f"grad_rel_err[{n}]"] = float((out["fused"]["grads"][n] - g).norm() / g.norm().clamp_min(1e-30))
    report["reference_parts"] = out["reference"]["parts"]
    report["fused_parts"] = out["fused"]["parts"]
    del teacher, student, out
    free()
    return report


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--answer_fraction", type=float, default=0.125, help="task stages: labelled fraction of tokens")
    p.add_argument("--check_layers", type=int, default=4, help="layers of the models of the correctness check")
    p.add_argument("--stages", default="sft,bitnet-sft,pretrain,distill")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = p.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA device"
    dcfg = DistillConfig(lambda_ld=10.0, gamma_ad=1e5, temperature=5.0, ad_layer=-1)
    device = torch.cuda.get_device_name()
    result = {"device": device, "date": datetime.datetime.utcnow().isoformat(timespec="seconds") + "Z",
              "torch": torch.__version__, "model": "Qwen3-0.6B shape, random init", "config": QWEN3_06B,
              "batch": args.batch, "seq": args.seq, "steps": args.steps, "distill": vars(dcfg), "stages": {}}
    import triton

    result["triton"] = triton.__version__
    print(f"{device}  torch {torch.__version__}  triton {triton.__version__}  batch {args.batch} x seq {args.seq}")

    result["check"] = check = check_distill(args, dcfg)
    print(f"correctness (fused vs reference, distill loss and gradients, {args.check_layers}-layer model):")
    for k, v in check.items():
        if not isinstance(v, dict):
            print(f"  {k:<55} {v:.2e}")
    ok = all(v < 2e-2 for k, v in check.items() if not isinstance(v, dict))
    result["check_ok"] = ok
    print("  OK" if ok else "  MISMATCH (numbers below still reported)")

    tokens = args.batch * args.seq
    vocab = QWEN3_06B["vocab_size"]
    for stage in args.stages.split(","):
        paths = {"n/a": None} if stage == "sft" else PATHS  # sft trains the FP model: no bitkernels op runs
        for path, backend in paths.items():
            free()
            teacher = None
            model = build(1)
            if stage == "sft":
                batch, loss_fn = make_batch(args.batch, args.seq, vocab, args.answer_fraction), causal_lm_loss
            elif stage in ("bitnet-sft", "pretrain"):
                convert_to_bitnet(model, backend=backend)
                frac = args.answer_fraction if stage == "bitnet-sft" else None
                batch, loss_fn = make_batch(args.batch, args.seq, vocab, frac), causal_lm_loss
            else:
                convert_to_bitnet(model, backend=backend)
                teacher = build(0, torch.bfloat16).eval().requires_grad_(False)
                batch = make_batch(args.batch, args.seq, vocab, args.answer_fraction)

                def loss_fn(m, b, teacher=teacher, backend=backend):
                    return bitdistill_loss(m, teacher, b, dcfg, backend=backend, loss_dtype=torch.bfloat16)
            try:
                r = measure(step_fn(model, loss_fn, batch), args.warmup, args.steps)
                r["tokens_per_s"] = tokens / (r["ms"] / 1e3)
            except torch.cuda.OutOfMemoryError as e:
                r = {"error": f"out of memory: {e}"[:300]}
            result["stages"].setdefault(stage, {})[path] = r
            print(f"  {stage:<11} {path:<9} " + (f"{r['ms']:8.1f} ms  {r['tokens_per_s']:9.0f} tok/s  "
                                                  f"peak {r['peak_bytes'] / 2**30:6.2f} GiB  loss {r['last_loss']:.3f}"
                                                  if "ms" in r else r["error"]))
            del model, teacher, batch
            free()

    print(f"\n{'stage':<11} {'fused tok/s':>12} {'ref tok/s':>10} {'speedup':>8} {'fused GiB':>10} {'ref GiB':>8} "
          f"{'mem ratio':>9}")
    for stage, by_path in result["stages"].items():
        if "fused" in by_path and "reference" in by_path and "ms" in by_path["fused"] and "ms" in by_path["reference"]:
            f, r = by_path["fused"], by_path["reference"]
            ratio = {"speedup": f["tokens_per_s"] / r["tokens_per_s"], "memory_ratio": f["peak_bytes"] / r["peak_bytes"]}
            result["stages"][stage]["fused_vs_reference"] = ratio
            print(f"{stage:<11} {f['tokens_per_s']:>12.0f} {r['tokens_per_s']:>10.0f} {ratio['speedup']:>7.2f}x "
                  f"{f['peak_bytes'] / 2**30:>10.2f} {r['peak_bytes'] / 2**30:>8.2f} {ratio['memory_ratio']:>8.2f}x")
        elif "n/a" in by_path and "ms" in by_path["n/a"]:
            r = by_path["n/a"]
            print(f"{stage:<11} {r['tokens_per_s']:>12.0f} {'(FP, no bitkernels op)':>21} {r['peak_bytes'] / 2**30:>16.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = out / f"{device.replace(' ', '-').lower()}-pipeline-{result['date'][:10]}.json"
    name.write_text(json.dumps(result, indent=1))
    print(f"wrote {name}")


if __name__ == "__main__":
    main()

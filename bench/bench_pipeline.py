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
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bitdistill.convert import convert_to_bitnet, set_backend  # noqa: E402
from bitdistill.data import IGNORE_INDEX  # noqa: E402
from bitdistill.losses import DistillConfig, bitdistill_loss, causal_lm_loss  # noqa: E402
from bitdistill.regional_compile import check_compile_mode, compile_decoder_layers, mark_step_begin  # noqa: E402
from bench.harness import git_provenance, write_json  # noqa: E402

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


def step_fn(model, loss_fn, batch, compile_mode=None):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), fused=True)

    def step():
        mark_step_begin(compile_mode)
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
    torch._dynamo.reset()  # also frees the CUDA-graph trees' private memory pools of a compiled path
    gc.collect()
    torch.cuda.empty_cache()


def _grad_rel_err(grads, truth) -> dict:
    return {n: float((grads[n] - g).norm() / g.norm().clamp_min(1e-30)) for n, g in truth.items()}


def check_distill(args, dcfg) -> dict:
    """Fused vs reference Stage-3 loss and student gradients on one batch (same models, same data).

    bf16 autocast moves int8 codes by a step here and there, and a step of a ternary/int8 network changes the
    gradient by more than rounding would: so the fused path's gradient error is judged against the reference's own
    bf16 error, both measured from the reference run in fp32 (no autocast) on the same batch. The fused path passes
    when its loss parts agree with the reference's to 1e-2 and its gradients are no further from the fp32 run than
    1.5x the reference's own bf16 gradients are (+1e-3)."""
    teacher = build(0, torch.bfloat16, layers=args.check_layers).eval().requires_grad_(False)
    student = convert_to_bitnet(build(1, layers=args.check_layers))
    batch = make_batch(2, 256, QWEN3_06B["vocab_size"], args.answer_fraction, seed=5)
    out = {}
    for run, backend, autocast in (("fused", None, True), ("reference", "torch", True),
                                   ("reference_fp32", "torch", False)):
        set_backend(student, backend)
        student.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            parts = bitdistill_loss(student, teacher, batch, dcfg, backend=backend,
                                    loss_dtype=torch.bfloat16 if autocast else torch.float32)
        parts["loss"].backward()
        out[run] = {"parts": {k: float(v.detach()) for k, v in parts.items()},
                    "grads": {n: p.grad.float().clone() for n, p in student.named_parameters()
                              if p.grad is not None and ("lm_head" in n or "embed" in n or "layers.0.self_attn.q_proj"
                                                         in n or "layers.0.mlp.down_proj" in n)}}
    parts_diff = {k: abs(out["fused"]["parts"][k] - v) / max(abs(v), 1e-12)
                  for k, v in out["reference"]["parts"].items()}
    truth = out["reference_fp32"]["grads"]
    fused_err, ref_err = _grad_rel_err(out["fused"]["grads"], truth), _grad_rel_err(out["reference"]["grads"], truth)
    report = {"parts_rel_diff": parts_diff, "grad_rel_err_fused_vs_fp32": fused_err,
              "grad_rel_err_reference_bf16_vs_fp32": ref_err,
              "grad_rel_diff_fused_vs_reference": _grad_rel_err(out["fused"]["grads"], out["reference"]["grads"]),
              "parts": {run: o["parts"] for run, o in out.items()}}
    report["ok"] = (all(v < 1e-2 for v in parts_diff.values())
                    and all(fused_err[n] <= 1.5 * ref_err[n] + 1e-3 for n in truth))
    del teacher, student, out
    free()
    return report


def print_check(check: dict, layers: int) -> None:
    print(f"correctness, {layers}-layer model, one batch (fused and reference under bf16 autocast, reference in fp32):")
    for k, v in check["parts_rel_diff"].items():
        print(f"  loss part {k:<8} fused vs reference rel diff {v:.2e}")
    print(f"  {'gradient':<44} {'fused-fp32':>11} {'ref bf16-fp32':>14} {'fused-ref':>10}")
    for n, v in check["grad_rel_err_fused_vs_fp32"].items():
        print(f"  {n:<44} {v:>11.2e} {check['grad_rel_err_reference_bf16_vs_fp32'][n]:>14.2e} "
              f"{check['grad_rel_diff_fused_vs_reference'][n]:>10.2e}")
    print("  OK" if check["ok"] else "  MISMATCH (numbers below still reported)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--answer_fraction", type=float, default=0.125, help="task stages: labelled fraction of tokens")
    p.add_argument("--check_layers", type=int, default=4, help="layers of the models of the correctness check")
    p.add_argument("--stages", default="sft,bitnet-sft,pretrain,distill")
    p.add_argument("--compile", default=None, help="also run both paths with their decoder layers compiled in this "
                                                   "torch.compile mode (bitdistill.regional_compile), e.g. "
                                                   "reduce-overhead")
    p.add_argument("--paths", default=None, help="subset of fused,reference[,fused+compile,reference+compile]")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = p.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA device"
    compile_mode = check_compile_mode(args.compile)
    if compile_mode:  # one layer graph per (stage, path, model): more than dynamo's default 8 per code object
        torch._dynamo.config.cache_size_limit = 64
    paths = {name: (backend, None) for name, backend in PATHS.items()}
    if compile_mode:
        paths.update({f"{name}+compile": (backend, compile_mode) for name, backend in PATHS.items()})
    if args.paths:
        unknown = set(args.paths.split(",")) - set(paths)
        if unknown:
            raise SystemExit(f"--paths: unknown {sorted(unknown)}; choose from {sorted(paths)} (+compile needs --compile)")
        paths = {k: v for k, v in paths.items() if k in args.paths.split(",")}
    dcfg = DistillConfig(lambda_ld=10.0, gamma_ad=1e5, temperature=5.0, ad_layer=-1)
    device = torch.cuda.get_device_name()
    result = {"device": device, "date": datetime.datetime.utcnow().isoformat(timespec="seconds") + "Z",
              "torch": torch.__version__, "model": "Qwen3-0.6B shape, random init", "config": QWEN3_06B,
              "batch": args.batch, "seq": args.seq, "steps": args.steps, "distill": vars(dcfg),
              "compile_mode": compile_mode, "stages": {}}
    import triton

    result["triton"] = triton.__version__
    print(f"{device}  torch {torch.__version__}  triton {triton.__version__}  batch {args.batch} x seq {args.seq}")

    result["check"] = check = check_distill(args, dcfg)
    result["check_ok"] = check["ok"]
    print_check(check, args.check_layers)

    tokens = args.batch * args.seq
    vocab = QWEN3_06B["vocab_size"]
    # compiled paths compile, record CUDA graphs (reduce-overhead), then replay: 3 warm-up steps; every path takes
    # the same number of steps, so their last losses compare
    warmup = max(args.warmup, 3) if compile_mode else args.warmup
    for stage in args.stages.split(","):
        # sft trains the FP model: no bitkernels op runs
        stage_paths = {"n/a": (None, None)} if stage == "sft" else paths
        for path, (backend, mode) in stage_paths.items():
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
                compile_decoder_layers(teacher, mode, skip=(dcfg.ad_layer,))
            # the distill stage's AD layer stays eager (its q/k/v are captured by hooks)
            compile_decoder_layers(model, mode, skip=(dcfg.ad_layer,) if stage == "distill" else ())
            try:
                r = measure(step_fn(model, loss_fn, batch, mode), warmup, args.steps)
                r["tokens_per_s"] = tokens / (r["ms"] / 1e3)
            except torch.cuda.OutOfMemoryError as e:
                r = {"error": f"out of memory: {e}"[:300]}
            result["stages"].setdefault(stage, {})[path] = r
            print(f"  {stage:<11} {path:<18} " + (f"{r['ms']:8.1f} ms  {r['tokens_per_s']:9.0f} tok/s  "
                                                  f"peak {r['peak_bytes'] / 2**30:6.2f} GiB  loss {r['last_loss']:.3f}"
                                                  if "ms" in r else r["error"]))
            del model, teacher, batch
            free()

    print(f"\n{'stage':<11} {'path':<18} {'tok/s':>9} {'x reference':>11} {'peak GiB':>9} {'x ref memory':>12}")
    for stage, by_path in result["stages"].items():
        ref = by_path.get("reference", {})
        for path, r in list(by_path.items()):
            if "ms" not in r:
                continue
            line = f"{stage:<11} {path:<18} {r['tokens_per_s']:>9.0f}"
            if "ms" in ref and path != "n/a":
                r["vs_reference"] = {"speedup": r["tokens_per_s"] / ref["tokens_per_s"],
                                     "memory_ratio": r["peak_bytes"] / ref["peak_bytes"]}
                line += f" {r['vs_reference']['speedup']:>10.2f}x"
            else:
                line += f" {'':>11}"
            line += f" {r['peak_bytes'] / 2**30:>9.2f}"
            if "vs_reference" in r:
                line += f" {r['vs_reference']['memory_ratio']:>11.2f}x"
            print(line)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = out / (f"{device.replace(' ', '-').lower()}-pipeline-{result['date'][:10]}-batch{args.batch}x{args.seq}"
                  + (f"-compile-{compile_mode}" if compile_mode else "") + ".json")
    write_json(name, {**result, **git_provenance()})
    print(f"wrote {name}")


if __name__ == "__main__":
    main()

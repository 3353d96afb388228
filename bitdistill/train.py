"""BitDistill pipeline: ``accelerate launch bitdistill/train.py --config bitdistill/configs/tiny.yaml``.

Stages (each runnable alone with ``--stages``, or chained; outputs under ``output_dir/<stage>/``):
  sft         fine-tune the full-precision model on the task: the teacher, and the FP16-SFT baseline
  bitnet-sft  convert to BitNet (SubLN + BitLinear) and fine-tune on the task without distillation (baseline)
  pretrain    Stage 2: convert, then continued pre-training (causal LM) on a general corpus, up to a token budget
  distill     Stage 3: the pretrained student learns the task from the frozen sft teacher: CE + lambda*LD + gamma*AD
With no arguments it runs every stage on the tiny generated task and tiny Qwen3 model (CPU, minutes) and prints the
summary table FP-SFT / BitNet-SFT / BitDistill. ``--set a.b=value`` overrides any config key (value parsed as YAML).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a script (accelerate launch bitdistill/train.py): make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn as nn

from bitdistill.config import (DEFAULT_CONFIG, PACKAGE_DIR, ConvertSection, PipelineConfig, fill_tiny_paths,
                               load_config, parse_config, read_config)
from bitdistill.convert import convert_to_bitnet, load_student
from bitdistill.data import encode_example, load_corpus_texts, load_task_split, pack_corpus
from bitdistill.evaluate import evaluate
from bitdistill.losses import bitdistill_loss, causal_lm_loss
from bitdistill.regional_compile import compile_decoder_layers
from bitdistill.summary import STAGES, summary_table, write_plot
from bitdistill.trainer import train

__all__ = ["load_config", "main", "run_stage"]  # load_config: re-exported for callers of bitdistill.train


# ------------------------------------------------------------------------------------------------------ models

def resolve_model_path(name_or_path: str) -> str:
    """A local directory, or a hub id (``org/name``); a path-like name that does not exist is an error."""
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"model directory {str(p)!r} has no config.json (not a HF model directory)")
        return str(p)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or os.sep in name_or_path.replace(
            "/", "") or name_or_path.endswith("/"):
        raise FileNotFoundError(f"model path {name_or_path!r} does not exist")
    return name_or_path


def load_fp_model(path: str, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(resolve_model_path(path), dtype=dtype)


def convert_base(path: str, conv: ConvertSection, backend: str | None):
    """Stage 1 on the base FP model: SubLN (``convert.layout``) and BitLinear."""
    return convert_to_bitnet(load_fp_model(path), subln=conv.subln, layout=conv.layout, per_channel=conv.per_channel,
                             subln_eps=conv.subln_eps, backend=backend)


def prepare_base(cfg: PipelineConfig, out: Path, accelerator) -> tuple[str, dict]:
    """The base FP model path (building the tiny one if none is given) and the tiny data files (if generated)."""
    from bitdistill import tiny

    files = {}
    if cfg.tiny_data or cfg.model.name_or_path is None:
        with accelerator.main_process_first():  # rank 0 writes, the others read what it wrote
            files = tiny.generate_data(out / "data", seed=cfg.seed, **cfg.tiny_data_sizes)
    if cfg.model.name_or_path is not None:
        return resolve_model_path(str(cfg.model.name_or_path)), files
    with accelerator.main_process_first():
        path = tiny.build_tiny_base(out / "base", files, seed=cfg.seed, **cfg.model.tiny)
    return path, files


def save_model(accelerator, model, tokenizer, directory: Path) -> None:
    """save_pretrained (safetensors) + tokenizer into ``<dir>.tmp``, renamed when complete; rank 0 writes."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp = directory.with_name(directory.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        accelerator.unwrap_model(model).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(directory, ignore_errors=True)
        tmp.replace(directory)
    accelerator.wait_for_everyone()


# ------------------------------------------------------------------------------------------------------ stages

@dataclass
class StageSetup:
    """What a stage trains: the model, its examples and loss, and (distill) the frozen teacher."""
    model: nn.Module
    examples: list
    loss_fn: Callable
    teacher: nn.Module | None = None
    eager_layers: tuple[int, ...] = ()  # decoder layers that stay uncompiled


def _converted_base(cfg: PipelineConfig, ctx: dict) -> nn.Module:
    return convert_base(ctx["base"], cfg.convert, ctx["backend"])


def build_sft(cfg: PipelineConfig, ctx: dict) -> StageSetup:
    return StageSetup(load_fp_model(ctx["base"]), ctx["train_examples"], causal_lm_loss)


def build_bitnet_sft(cfg: PipelineConfig, ctx: dict) -> StageSetup:
    return StageSetup(_converted_base(cfg, ctx), ctx["train_examples"], causal_lm_loss)


def build_pretrain(cfg: PipelineConfig, ctx: dict) -> StageSetup:
    model = _converted_base(cfg, ctx)
    pre, corpus = cfg.pretrain, cfg.pretrain.corpus
    texts = [] if corpus.files and not (corpus.file or corpus.name) else \
        load_corpus_texts(corpus.file, corpus.name, corpus.subset, corpus.split, corpus.text_column)
    for extra in corpus.files:
        texts = itertools.chain(texts, load_corpus_texts(extra, text_column=corpus.text_column))
    examples = pack_corpus(ctx["tokenizer"], texts, pre.block_size, pre.token_budget)
    ctx["accelerator"].print(f"[pretrain] {len(examples)} blocks x {pre.block_size} tokens")
    return StageSetup(model, examples, causal_lm_loss)


def build_distill(cfg: PipelineConfig, ctx: dict) -> StageSetup:
    accelerator, backend, out = ctx["accelerator"], ctx["backend"], ctx["out"]
    section, dcfg = cfg.distill, cfg.distill.loss
    # student "convert": Stage 1 applied to the base model here, skipping Stage 2 (the no-Stage-2 ablation)
    fresh = section.student == "convert"
    student_path = Path(ctx["base"]) if fresh else Path(section.student or out / "pretrain" / "model")
    teacher_path = Path(section.teacher or out / "sft" / "model")
    for role, path, producer in (("student", student_path, "pretrain"), ("teacher", teacher_path, "sft")):
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"[distill] {role} {str(path)!r} does not exist: run the {producer!r} "
                                    f"stage first (--stages {producer}) or set distill.{role}")
    model = _converted_base(cfg, ctx) if fresh else load_student(student_path, backend=backend)
    model.train()
    teacher_dtype = getattr(torch, section.teacher_dtype)
    teacher = load_fp_model(str(teacher_path), dtype=teacher_dtype).to(accelerator.device).eval()
    teacher.requires_grad_(False)
    vs, vt = model.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0]
    if vs != vt:
        raise ValueError(f"[distill] teacher vocabulary ({vt}, {teacher_path}) differs from the student's "
                         f"({vs}, {student_path}): both must come from the same base model and tokenizer")
    loss_dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else None

    def loss_fn(m, batch):
        return bitdistill_loss(m, teacher, batch, dcfg, backend=backend, loss_dtype=loss_dtype)

    # the distilled layer stays eager: its q/k/v are captured by hooks every step
    eager = (dcfg.ad_layer,) if dcfg.gamma_ad else ()
    return StageSetup(model, ctx["train_examples"], loss_fn, teacher, eager)


STAGE_BUILDERS = {"sft": build_sft, "bitnet-sft": build_bitnet_sft, "pretrain": build_pretrain,
                  "distill": build_distill}
assert tuple(STAGE_BUILDERS) == STAGES, "a builder for every stage, in the pipeline's order"


def run_stage(stage: str, cfg: PipelineConfig, ctx: dict) -> dict:
    """Build the stage's model, train it, save it and (except pretrain) evaluate it; ``result.json`` marks it done."""
    accelerator, tokenizer, out, resume = ctx["accelerator"], ctx["tokenizer"], ctx["out"], ctx["resume"]
    stage_dir = out / stage
    result_file = stage_dir / "result.json"
    if resume and result_file.is_file():
        accelerator.print(f"[{stage}] already done ({result_file}); skipping")
        return json.loads(result_file.read_text())
    if accelerator.is_main_process and not resume:
        shutil.rmtree(stage_dir / "checkpoints", ignore_errors=True)
        result_file.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    if stage not in STAGE_BUILDERS:
        raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")
    args = cfg.train_args(stage)
    spec, seed = cfg.task, cfg.seed
    setup = STAGE_BUILDERS[stage](cfg, ctx)
    model, examples, loss_fn, teacher = setup.model, setup.examples, setup.loss_fn, setup.teacher
    for m in (model, teacher):
        if m is not None:
            compile_decoder_layers(m, args.compile, setup.eager_layers)
    t0 = time.perf_counter()
    run = train(accelerator, model, examples, loss_fn, args, stage_dir, stage, tokenizer.pad_token_id, seed, resume)
    seconds = time.perf_counter() - t0
    model = run["model"]
    result = {"stage": stage, "steps": run["steps"], "seconds": seconds,
              "tokens": sum(r.get("tokens", 0) for r in run["history"]), "final": run["history"][-1]}
    step_seconds = sorted(r["seconds"] for r in run["history"] if "seconds" in r)
    if step_seconds:  # the median step: the loop's time without its first steps' compiles and the checkpoints
        result["median_step_seconds"] = step_seconds[len(step_seconds) // 2]
    if run["stopped_early"]:
        accelerator.print(f"[{stage}] stopped after step {run['steps']} (stop_after_steps or train.deadline); "
                          "rerun with --resume")
        result["stopped_early"] = True
        return result
    save_model(accelerator, model, tokenizer, stage_dir / "model")
    if stage != "pretrain":
        result["metrics"] = evaluate(model, tokenizer, spec, ctx["eval_rows"], accelerator,
                                     batch_size=args.eval_batch_size)
        accelerator.print(f"[{stage}] eval: {result['metrics']}")
    if accelerator.is_main_process:
        (stage_dir / "history.json").write_text(json.dumps(run["history"]))
        tmp = result_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(result_file)
    accelerator.wait_for_everyone()
    del model, teacher
    return result


# ------------------------------------------------------------------------------------------------------ main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help=f"YAML config (default {DEFAULT_CONFIG.relative_to(PACKAGE_DIR.parent)})")
    p.add_argument("--stages", default=None, help=f"comma-separated subset of {','.join(STAGES)} (default: config)")
    p.add_argument("--output_dir", default=None)
    p.add_argument("--model", default=None, help="HF model id or local directory (overrides model.name_or_path)")
    p.add_argument("--backend", default=None, choices=["auto", "triton", "torch"],
                   help="bitkernels path for BitLinear and the losses: fused Triton (auto on GPU) or the reference")
    p.add_argument("--resume", action="store_true", help="skip finished stages, continue the others from their "
                                                         "latest checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import AutoTokenizer

    a = parse_args(argv)
    raw = read_config(a.config, a.set)
    for key, value in (("output_dir", a.output_dir), ("backend", a.backend), ("stages", a.stages)):
        if value:
            raw[key] = value
    if a.model:
        raw.setdefault("model", {})["name_or_path"] = a.model
    cfg = parse_config(raw)  # every key, type and choice checked here, once
    stages = cfg.stages
    out = Path(cfg.output_dir)
    backend = None if cfg.backend == "auto" else cfg.backend

    try:
        import tensorboard  # noqa: F401

        log_with = "tensorboard"
    except ImportError:
        log_with = None
    mixed = cfg.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if torch.cuda.is_available() else "no"
    # cpu=True on CPU-only hosts: without it a multi-process CPU launch (torchrun) is not seen as distributed
    accelerator = Accelerator(mixed_precision=mixed, log_with=log_with, project_dir=str(out / "logs"),
                              cpu=not torch.cuda.is_available())
    set_seed(cfg.seed)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.resolved.yaml").write_text(__import__("yaml").safe_dump(raw))
    base, files = prepare_base(cfg, out, accelerator)
    cfg = fill_tiny_paths(cfg, files)
    if log_with:
        accelerator.init_trackers("bitdistill")

    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    spec = cfg.task
    needs_task = any(s != "pretrain" for s in stages)
    train_rows = load_task_split(spec, "train") if needs_task else []
    eval_rows = load_task_split(spec, "eval") if needs_task else []
    if spec.type == "classification" and needs_task:
        from bitdistill.data import label_token_ids

        label_token_ids(tokenizer, spec.label_words)  # fail early on ambiguous label words
    ctx = {"accelerator": accelerator, "tokenizer": tokenizer, "out": out, "resume": a.resume, "base": base,
           "backend": backend, "spec": spec, "eval_rows": eval_rows,
           "train_examples": [encode_example(tokenizer, spec, r) for r in train_rows]}

    results = {}
    for stage in stages:
        results[stage] = run_stage(stage, cfg, ctx)
        if results[stage].get("stopped_early"):  # the next stage would need this one's model
            break
    for stage in STAGES:  # include earlier runs' results in the table
        if stage not in results and (out / stage / "result.json").is_file():
            results[stage] = json.loads((out / stage / "result.json").read_text())
    table = summary_table(results, spec.type)
    if accelerator.is_main_process:
        (out / "summary.json").write_text(json.dumps(results, indent=1))
        plot = write_plot(results, out, spec.type)
        print(f"\n{table}\n\nresults: {out / 'summary.json'}" + (f"\nplot: {plot}" if plot else ""))
    accelerator.end_training()
    return results


if __name__ == "__main__":
    main()

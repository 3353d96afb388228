"""The training loop shared by every stage, on ``accelerate`` (CPU, one GPU, several GPUs with DDP).

- Batches are a pure function of (seed, step, rank): each epoch is a seeded permutation of the examples and the
  global step ``s`` takes the next ``batch_size * world * grad_accum`` of that stream, so ``--resume`` continues
  with exactly the batches (and the numbers) the uninterrupted run would have seen.
- Checkpoints (model, optimizer, scheduler, RNG states, history) every ``checkpoint_every`` optimizer steps through
  ``accelerator.save_state`` into ``checkpoint-<step>.tmp``, renamed when complete: a crash never leaves a partial
  checkpoint under a valid name. All ranks call the save (each writes its RNG state); rank 0 renames.
- A non-finite loss on any rank stops every rank with the step and the last good checkpoint named.
"""
from __future__ import annotations

import json
import math
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .data import collate
from .regional_compile import mark_step_begin


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainArgs:
    lr: float = 1e-4
    batch_size: int = 8               # per device, per micro-step
    grad_accum: int = 1               # micro-steps per optimizer step
    max_steps: int | None = None      # optimizer steps; or derived from epochs
    epochs: float = 1.0
    warmup_ratio: float = 0.05
    scheduler: str = "cosine"         # transformers.get_scheduler name
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    checkpoint_every: int = 0         # optimizer steps between checkpoints (0: only the last step)
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_batch_size: int = 32
    stop_after_steps: int | None = None   # end this session after this step (checkpointed), resumable later
    compile: str | None = None        # torch.compile mode of each decoder layer (bitdistill.regional_compile)
    pad_to_multiple_of: int = 1       # round batch lengths up (with compile: one graph per length bucket)


def total_steps(args: TrainArgs, n_examples: int, world: int) -> int:
    if args.max_steps:
        return int(args.max_steps)
    per_step = args.batch_size * world * args.grad_accum
    return max(1, math.ceil(args.epochs * n_examples / per_step))


def batch_indices(n: int, seed: int, step: int, micro: int, rank: int, args: TrainArgs, world: int) -> list[int]:
    """Example indices of (step, micro-step, rank): position p of the stream of seeded epoch permutations."""
    per_micro = args.batch_size * world
    start = (step * args.grad_accum + micro) * per_micro + rank * args.batch_size
    out, cache = [], {}
    for p in range(start, start + args.batch_size):
        epoch = p // n
        if epoch not in cache:
            cache[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
        out.append(cache[epoch][p % n])
    return out


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = [(int(p.name.split("-")[1]), p) for p in ckpt_dir.glob("checkpoint-*")
             if p.is_dir() and p.name.split("-")[1].isdigit() and (p / "trainer_state.json").is_file()]
    return max(found)[1] if found else None


def train(accelerator, model, examples: list[dict], loss_fn: Callable, args: TrainArgs, stage_dir: Path,
          stage: str, pad_id: int, seed: int, resume: bool) -> dict:
    """Train ``model`` (unwrapped nn.Module) on ``examples`` with ``loss_fn(model, batch) -> {"loss", parts...}``.
    Returns {"model": the trained unwrapped model, "history": [...], "steps": n, "stopped_early": bool}."""
    from transformers import get_scheduler
    from tqdm.auto import tqdm

    world, rank = accelerator.num_processes, accelerator.process_index
    steps = total_steps(args, len(examples), world)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    scheduler = get_scheduler(args.scheduler, optimizer, num_warmup_steps=int(args.warmup_ratio * steps),
                              num_training_steps=steps)
    # One Accelerator serves every stage: forget the previous stage's objects, or save_state/load_state would
    # write and read them too (and load stage 1's model into stage 3's).
    accelerator.free_memory()
    accelerator._custom_objects.clear()
    # The scheduler is stepped once per optimizer step by us (a prepared one steps `world` times per call).
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    ckpt_dir = stage_dir / "checkpoints"
    start, history, last_good = 0, [], None
    if resume and (found := latest_checkpoint(ckpt_dir)) is not None:
        accelerator.load_state(str(found))
        state = json.loads((found / "trainer_state.json").read_text())
        start, history, last_good = state["step"], state["history"], found
        accelerator.print(f"[{stage}] resumed from {found} at step {start}/{steps}")
    accelerator.wait_for_everyone()

    stop_at = min(steps, args.stop_after_steps) if args.stop_after_steps else steps
    bar = tqdm(total=steps, initial=start, desc=stage, disable=not accelerator.is_local_main_process)
    model.train()
    for step in range(start, stop_at):
        sums: dict[str, float] = {}
        for micro in range(args.grad_accum):
            idx = batch_indices(len(examples), seed, step, micro, rank, args, world)
            batch = {k: v.to(accelerator.device) for k, v in collate([examples[i] for i in idx], pad_id,
                                                                  pad_to_multiple_of=args.pad_to_multiple_of).items()}
            sums["tokens"] = sums.get("tokens", 0.0) + float(batch["attention_mask"].sum())
            sync = accelerator.no_sync(model) if micro < args.grad_accum - 1 else nullcontext()
            mark_step_begin(args.compile)
            with sync, accelerator.autocast():
                parts = loss_fn(model, batch)
                loss = parts["loss"]
                finite = torch.isfinite(loss.detach()).float()
                if accelerator.reduce(finite, "min").item() < 1:
                    raise NonFiniteLossError(
                        f"[{stage}] loss is {loss.item()} at step {step + 1} (micro-step {micro}): training "
                        f"stopped. Last good checkpoint: {last_good or 'none (no checkpoint yet)'}. Lower the "
                        f"learning rate or check the data, then rerun with --resume.")
                accelerator.backward(loss / args.grad_accum)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / args.grad_accum
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm) if args.max_grad_norm else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        record = {k: accelerator.reduce(torch.tensor(v, device=accelerator.device),
                                        "sum" if k == "tokens" else "mean").item() for k, v in sums.items()}
        record.update(step=step + 1, lr=scheduler.get_last_lr()[0])
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        history.append(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        if (step + 1) % args.log_every == 0 or step + 1 == stop_at:
            accelerator.log({f"{stage}/{k}": v for k, v in record.items() if k != "step"}, step=step + 1)
        if (args.checkpoint_every and (step + 1) % args.checkpoint_every == 0) or step + 1 == stop_at:
            last_good = save_checkpoint(accelerator, ckpt_dir, step + 1, history, args.keep_checkpoints)
    bar.close()
    return {"model": accelerator.unwrap_model(model), "history": history, "steps": stop_at,
            "stopped_early": stop_at < steps}


def save_checkpoint(accelerator, ckpt_dir: Path, step: int, history: list, keep: int) -> Path:
    final = ckpt_dir / f"checkpoint-{step}"
    tmp = ckpt_dir / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "history": history}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.replace(final)
        done = sorted((int(p.name.split("-")[1]), p) for p in ckpt_dir.glob("checkpoint-*")
                      if p.name.split("-")[1].isdigit())
        for _, old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final

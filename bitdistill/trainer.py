"""The training loop shared by every stage, on ``accelerate`` (CPU, one GPU, several GPUs with DDP).

- Batches are a pure function of (seed, step, rank): each epoch is a seeded permutation of the examples and the
  global step ``s`` takes the next ``batch_size * world * grad_accum`` of that stream, so ``--resume`` continues
  with exactly the batches (and the numbers) the uninterrupted run would have seen.
- Checkpoints (model, optimizer, scheduler, per-rank RNG states, history; no pickles) every ``checkpoint_every``
  optimizer steps, at ``stop_after_steps``, at the ``deadline`` and at the last step: see ``bitdistill.checkpoint``
  (complete only once its manifest is written; ``--resume`` takes the newest one that matches its manifest).
- A non-finite loss on any rank stops every rank with the step and the last good checkpoint named.
"""
from __future__ import annotations

import math
import time
from time import perf_counter  # step timing; `time.time` alone is the deadline clock (tests replace it)
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import checkpoint
from .data import collate
from .regional_compile import mark_step_begin


class NonFiniteLossError(RuntimeError):
    pass


# transformers.get_scheduler names this loop can drive (the others need a metric or extra kwargs)
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")


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
    deadline: float | None = None     # time.time() epoch seconds: after the first optimizer step ending at or past
                                      # it, checkpoint and stop (stopped_early), resumable later like stop_after_steps
    compile: str | None = None        # torch.compile mode of each decoder layer (bitdistill.regional_compile)
    pad_to_multiple_of: int = 1       # round batch lengths up (with compile: one graph per length bucket)

    def __post_init__(self):
        """Range checks; a ValueError names the config key (``train.<field>``) and the allowed range."""
        def need(name, ok, allowed, optional=False):
            v = getattr(self, name)
            if v is None and optional:
                return
            try:
                good = not isinstance(v, bool) and math.isfinite(v) and ok(v)
            except TypeError:
                good = False
            if not good:
                raise ValueError(f"train.{name} must be {allowed}{' or null' if optional else ''}, got {v!r}")

        need("lr", lambda v: v > 0, "a finite number > 0")
        need("epochs", lambda v: v > 0, "a finite number > 0")
        need("warmup_ratio", lambda v: 0 <= v < 1, "in [0, 1)")
        need("weight_decay", lambda v: v >= 0, "a finite number >= 0")
        need("max_grad_norm", lambda v: v >= 0, "a finite number >= 0 (0: no clipping)")
        need("deadline", lambda v: True, "a time.time() value (epoch seconds)", optional=True)
        for name in ("batch_size", "grad_accum", "log_every", "eval_batch_size", "pad_to_multiple_of",
                     "keep_checkpoints"):
            need(name, lambda v: v == int(v) and v >= 1, "an integer >= 1")
        need("checkpoint_every", lambda v: v == int(v) and v >= 0, "an integer >= 0 (0: only the last step)")
        for name in ("max_steps", "stop_after_steps"):
            need(name, lambda v: v == int(v) and v >= 1, "an integer >= 1", optional=True)
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"train.scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")


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
    """The newest valid checkpoint (see ``bitdistill.checkpoint.latest_valid``)."""
    return checkpoint.latest_valid(ckpt_dir)


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
    # One Accelerator serves every stage: release the previous stage's prepared objects.
    accelerator.free_memory()
    # The scheduler is stepped once per optimizer step by us (a prepared one steps `world` times per call).
    model, optimizer = accelerator.prepare(model, optimizer)

    ckpt_dir = stage_dir / "checkpoints"
    start, history, last_good = 0, [], None
    if resume and (found := checkpoint.resume_point(accelerator, ckpt_dir)) is not None:
        state = checkpoint.load(accelerator, found, model, optimizer, scheduler)
        start, history, last_good = state["step"], state["history"], found
        accelerator.print(f"[{stage}] resumed from {found} at step {start}/{steps}")
    accelerator.wait_for_everyone()

    stop_at = min(steps, args.stop_after_steps) if args.stop_after_steps else steps
    bar = tqdm(total=steps, initial=start, desc=stage, disable=not accelerator.is_local_main_process)
    model.train()
    for step in range(start, stop_at):
        t_step = perf_counter()
        # The step's scalars stay on the device until one read at its end: a read mid-step (.item(), float())
        # makes the host wait for the GPU, which then idles while the host issues the rest of the step.
        sums: dict[str, torch.Tensor] = {}
        bad = torch.zeros((), device=accelerator.device)
        tokens = 0.0
        for micro in range(args.grad_accum):
            idx = batch_indices(len(examples), seed, step, micro, rank, args, world)
            cpu_batch = collate([examples[i] for i in idx], pad_id, pad_to_multiple_of=args.pad_to_multiple_of)
            tokens += float(cpu_batch["attention_mask"].sum())
            batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in cpu_batch.items()}
            sync = accelerator.no_sync(model) if micro < args.grad_accum - 1 else nullcontext()
            mark_step_begin(args.compile)
            with sync, accelerator.autocast():
                parts = loss_fn(model, batch)
                loss = parts["loss"]
                bad = torch.maximum(bad, (~torch.isfinite(loss.detach())).float())
                accelerator.backward(loss / args.grad_accum)
            checkpoint.fault_point(f"step:{step + 1}")
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() / args.grad_accum
        # Before the optimizer step: a non-finite loss (on any rank; accelerate's reduce knows sum/mean/max only)
        # must not reach the weights.
        if accelerator.reduce(bad, "max").item() > 0:
            raise NonFiniteLossError(
                f"[{stage}] loss is {float(sums['loss'])} at step {step + 1} (before its optimizer step): training "
                f"stopped. Last good checkpoint: {last_good or 'none (no checkpoint yet)'}. Lower the learning rate "
                f"or check the data, then rerun with --resume.")
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm) if args.max_grad_norm else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        names = list(sums)
        norm = [] if grad_norm is None else [torch.as_tensor(grad_norm, dtype=torch.float32, device=accelerator.device)]
        values = accelerator.reduce(torch.stack([sums[k] for k in names] + norm), "mean").tolist()
        record = dict(zip(names, values[:len(names)]))
        record["tokens"] = accelerator.reduce(torch.tensor(tokens, device=accelerator.device), "sum").item()
        record.update(step=step + 1, lr=scheduler.get_last_lr()[0])
        if grad_norm is not None:
            record["grad_norm"] = values[-1]  # clipping all-reduced the gradients: every rank's norm is the same
        record["seconds"] = perf_counter() - t_step
        history.append(record)
        done = step + 1
        if done < stop_at and past_deadline(accelerator, args.deadline):
            stop_at = done
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        if done % args.log_every == 0 or done == stop_at:
            accelerator.log({f"{stage}/{k}": v for k, v in record.items() if k != "step"}, step=step + 1)
        if (args.checkpoint_every and done % args.checkpoint_every == 0) or done == stop_at:
            last_good = checkpoint.save(accelerator, ckpt_dir, done, model, optimizer, scheduler, history,
                                        args.keep_checkpoints)
        if done == stop_at:
            break
    bar.close()
    return {"model": accelerator.unwrap_model(model), "history": history, "steps": stop_at,
            "stopped_early": stop_at < steps}


def past_deadline(accelerator, deadline: float | None) -> bool:
    """Whether any rank's clock is at or past ``deadline``: one decision for all ranks, so all stop at one step."""
    if deadline is None:
        return False
    late = torch.tensor(float(time.time() >= deadline), device=accelerator.device)
    return accelerator.reduce(late, "max").item() > 0

"""Greedy generation, classification and timing on any HF causal LM (packed or not), with an explicit KV cache loop.

The same loop runs the packed student and the torch baselines, so their timings differ only by the model.
"""
from __future__ import annotations

import time

import torch


@torch.inference_mode()
def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None) -> dict:
    """Greedy decode of one prompt [1, P]. Returns tokens [1, P + T] and the prefill / decode seconds."""
    from transformers import DynamicCache

    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, prompt_length], got {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    cache = DynamicCache()
    t0 = time.perf_counter()
    out = model(input_ids=input_ids, past_key_values=cache, use_cache=True)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    t1 = time.perf_counter()
    tokens = [nxt]
    for _ in range(max_new_tokens - 1):
        if eos_token_id is not None and int(nxt) == eos_token_id:
            break
        out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(nxt)
    t2 = time.perf_counter()
    return {"tokens": torch.cat([input_ids, *tokens], dim=1), "prefill_s": t1 - t0, "decode_s": t2 - t1,
            "decode_steps": len(tokens) - 1, "prompt_len": input_ids.shape[1]}


@torch.inference_mode()
def classify(model, prompts: list[torch.Tensor], label_token_ids: list[int]) -> tuple[list[int], torch.Tensor]:
    """Restricted argmax over the label words' first tokens at the answer position (bitdistill.data's metric).
    Returns (predicted label ids, logits [n, n_labels] in float32)."""
    if len(label_token_ids) < 2:
        raise ValueError("classification needs at least two label token ids")
    rows = []
    for ids in prompts:
        ids = ids.reshape(1, -1)
        rows.append(model(input_ids=ids).logits[0, -1, label_token_ids].float())
    logits = torch.stack(rows)
    return logits.argmax(-1).tolist(), logits

"""Greedy generation, classification and timing on any HF causal LM (packed or not).

The same loop runs the packed student and the torch baselines, so their timings differ only by their modules (the
linear layers, the embedding and the head). ``loop``: "lean" is ``cpu_ref.decoder.LeanDecoder`` (static KV cache,
minimal per-layer forward; Llama / Qwen2 / Qwen3 layouts), "hf" the model's own forward with a DynamicCache, "auto"
(default) lean where supported, else hf. The result says which one ran.
"""
from __future__ import annotations

import time

import torch

LOOPS = ("auto", "lean", "hf")


def make_decoder(model, max_len: int, loop: str = "auto"):
    """A LeanDecoder of ``max_len`` positions for ``loop`` "lean" / "auto" (where supported), else None (HF)."""
    from .decoder import LeanDecoder, unsupported_reason

    if loop not in LOOPS:
        raise ValueError(f"loop must be one of {LOOPS}, got {loop!r}")
    if loop == "hf" or (loop == "auto" and unsupported_reason(model) is not None):
        return None
    return LeanDecoder(model, max_len)  # loop == "lean" on an unsupported model raises here, saying why


@torch.inference_mode()
def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None,
                    loop: str = "auto") -> dict:
    """Greedy decode of one prompt [1, P]. Returns tokens [1, P + T], the prefill / decode seconds and the loop."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, prompt_length], got {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    decoder = make_decoder(model, input_ids.shape[1] + max_new_tokens, loop)
    if decoder is not None:
        step = decoder
    else:
        from transformers import DynamicCache

        cache = DynamicCache()

        def step(ids):
            return model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]

    t0 = time.perf_counter()
    nxt = step(input_ids).argmax(-1, keepdim=True)
    t1 = time.perf_counter()
    tokens = [nxt]
    for _ in range(max_new_tokens - 1):
        if eos_token_id is not None and int(nxt) == eos_token_id:
            break
        nxt = step(nxt).argmax(-1, keepdim=True)
        tokens.append(nxt)
    t2 = time.perf_counter()
    return {"tokens": torch.cat([input_ids, *tokens], dim=1), "prefill_s": t1 - t0, "decode_s": t2 - t1,
            "decode_steps": len(tokens) - 1, "prompt_len": input_ids.shape[1],
            "loop": "lean" if decoder is not None else "hf"}


@torch.inference_mode()
def classify(model, prompts: list[torch.Tensor], label_token_ids: list[int],
             loop: str = "auto") -> tuple[list[int], torch.Tensor]:
    """Restricted argmax over the label words' first tokens at the answer position (bitdistill.data's metric).
    Returns (predicted label ids, logits [n, n_labels] in float32)."""
    if len(label_token_ids) < 2:
        raise ValueError("classification needs at least two label token ids")
    prompts = [ids.reshape(1, -1) for ids in prompts]
    decoder = make_decoder(model, max((p.shape[1] for p in prompts), default=1), loop)
    rows = []
    for ids in prompts:
        if decoder is not None:
            decoder.reset()
            last = decoder(ids)
        else:
            last = model(input_ids=ids).logits[:, -1]
        rows.append(last[0, label_token_ids].float())
    logits = torch.stack(rows)
    return logits.argmax(-1).tolist(), logits

"""Task evaluation, sharded over ranks and summed with ``accelerator.reduce`` (every rank gets the same numbers).

classification: accuracy of the restricted argmax over the label words' first tokens at the answer position.
summarization: greedy generation (up to ``max_target_length`` tokens, stops at EOS), ROUGE-1/2/L F1 x100.
"""
from __future__ import annotations

import torch

from .data import TaskSpec, collate, encode_example, label_token_ids
from .metrics import rouge_scores


@torch.no_grad()
def evaluate(model, tokenizer, spec: TaskSpec, rows: list[dict], accelerator=None, batch_size: int = 32) -> dict:
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    mine = rows[rank::world]
    was_training = model.training
    model.eval()
    autocast = accelerator.autocast() if accelerator is not None else torch.autocast(device.type, enabled=False)
    with autocast:
        if spec.type == "classification":
            sums = _classification_sums(model, tokenizer, spec, mine, device, batch_size)
        else:
            sums = _summarization_sums(model, tokenizer, spec, mine, device, batch_size)
    model.train(was_training)
    totals = torch.tensor(sums, dtype=torch.float64, device=device)
    if accelerator is not None and world > 1:
        totals = accelerator.reduce(totals, "sum")
    totals = totals.tolist()
    n = max(totals[-1], 1.0)
    if spec.type == "classification":
        return {"accuracy": 100.0 * totals[0] / n, "n": int(totals[-1])}
    return {"rouge1": 100.0 * totals[0] / n, "rouge2": 100.0 * totals[1] / n, "rougeL": 100.0 * totals[2] / n,
            "n": int(totals[-1])}


def _classification_sums(model, tokenizer, spec, rows, device, batch_size):
    candidates = torch.tensor(label_token_ids(tokenizer, spec.label_words), device=device)
    correct = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        enc = [encode_example(tokenizer, spec, r, with_answer=False) for r in chunk]
        batch = collate(enc, tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits
        last = torch.tensor([e["prompt_length"] - 1 for e in enc], device=device)
        answer_logits = logits[torch.arange(len(enc), device=device), last][:, candidates]
        predicted = answer_logits.argmax(-1)
        correct += int((predicted.cpu() == torch.tensor([r["label"] for r in chunk])).sum())
    return [correct, len(rows)]


def _summarization_sums(model, tokenizer, spec, rows, device, batch_size):
    totals = [0.0, 0.0, 0.0]
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        enc = [encode_example(tokenizer, spec, r, with_answer=False) for r in chunk]
        batch = collate(enc, tokenizer.pad_token_id, left_pad=True)
        out = model.generate(input_ids=batch["input_ids"].to(device),
                             attention_mask=batch["attention_mask"].to(device),
                             max_new_tokens=spec.max_target_length, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        width = batch["input_ids"].shape[1]
        for row, generated in zip(chunk, out[:, width:]):
            text = tokenizer.decode(generated, skip_special_tokens=True)
            scores = rouge_scores(text, row["summary"])
            totals = [t + scores[k] for t, k in zip(totals, ("rouge1", "rouge2", "rougeL"))]
    return totals + [len(rows)]

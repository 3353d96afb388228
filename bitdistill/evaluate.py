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
        return {"accuracy": 100.0 * totals[0] / n, "macro_f1": macro_f1(totals[1:-1], len(spec.label_words)),
                "n": int(totals[-1])}
    return {"rouge1": 100.0 * totals[0] / n, "rouge2": 100.0 * totals[1] / n, "rougeL": 100.0 * totals[2] / n,
            "n": int(totals[-1])}


def macro_f1(confusion: list[float], classes: int) -> float:
    """Macro-averaged F1 x100 from a flattened [true, predicted] count matrix (a class never predicted nor present
    scores 0, as scikit-learn's zero_division=0)."""
    m = torch.tensor(confusion, dtype=torch.float64).reshape(classes, classes)
    tp, support, predicted = m.diag(), m.sum(1), m.sum(0)
    f1 = torch.where(support + predicted > 0, 2 * tp / (support + predicted).clamp_min(1e-12), torch.zeros(()))
    return 100.0 * float(f1.mean())


def _classification_sums(model, tokenizer, spec, rows, device, batch_size):
    """[correct, confusion matrix (true x predicted, flattened)..., n]. Only the answer position goes through the
    LM head: the [batch, length, vocab] logits of a whole batch would dominate the evaluation's memory."""
    candidates = torch.tensor(label_token_ids(tokenizer, spec.label_words), device=device)
    classes = len(spec.label_words)
    correct, confusion = 0, torch.zeros(classes * classes, dtype=torch.float64)
    head = model.get_output_embeddings()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        enc = [encode_example(tokenizer, spec, r, with_answer=False) for r in chunk]
        batch = collate(enc, tokenizer.pad_token_id)
        out = model.get_decoder()(input_ids=batch["input_ids"].to(device),
                                  attention_mask=batch["attention_mask"].to(device))
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        last = torch.tensor([e["prompt_length"] - 1 for e in enc], device=device)
        answer_logits = head(hidden[torch.arange(len(enc), device=device), last])[:, candidates]
        predicted = answer_logits.argmax(-1).cpu()
        truth = torch.tensor([r["label"] for r in chunk])
        correct += int((predicted == truth).sum())
        confusion += torch.bincount(truth * classes + predicted, minlength=classes * classes).double()
    return [correct, *confusion.tolist(), len(rows)]


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

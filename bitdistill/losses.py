"""Stage losses, composed from the bitkernels functional API (``backend=None`` fused Triton on GPU, ``"torch"`` the
reference), so one switch runs the whole pipeline on either path.

Stage 3 (BitDistill):  L = CE + lambda * LD + gamma * AD
- CE: next-token cross-entropy of the student on the answer tokens (labels != -100);
- LD: KL(softmax(z_t / tau) || softmax(z_s / tau)) * tau^2 on the logit rows chosen by ``kd_positions``;
  computed from final hidden states and the two LM-head weights by ``fused_linear_distill_loss``, which on the fused
  path never materializes the [tokens, vocab] logits;
- AD: MiniLM-v2 attention-relation distillation on one layer's q/k/v projection outputs (``ad_split``), captured
  with forward hooks, ``num_relation_heads`` relation heads (teacher and student head counts need not match).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitkernels.functional import attention_relation_distill_loss, fused_linear_distill_loss

from .data import IGNORE_INDEX


@dataclass
class DistillConfig:
    lambda_ld: float = 10.0         # weight of the logits-distillation KL
    gamma_ad: float = 1e5           # weight of the attention-relation distillation
    temperature: float = 5.0        # tau of the logits KL (the loss is multiplied by tau^2)
    ad_layer: int = -1              # which decoder layer's q/k/v to distill (negative counts from the end)
    relation_heads: int | None = None   # relation heads; None: the teacher's attention heads (reduced to divide dims)
    ad_split: tuple = ("q", "k", "v")   # which projections give relations (MiniLM-v2: Q-Q, K-K, V-V)
    ad_causal: bool = False         # mask relations to j <= i (False: all non-padding pairs, as MiniLM-v2)
    kd_positions: str = "all"       # LD rows: "all" non-padding next-token positions, or "answer" (CE rows only)
    chunk_size: int | None = None   # rows per chunk of the fused logits KD (None: the kernel's choice)


# ------------------------------------------------------------------------------------------------ model plumbing

def decoder_layers(model: nn.Module) -> nn.ModuleList:
    from .convert import find_decoder_layers

    return find_decoder_layers(model)[1]


def default_relation_heads(teacher: nn.Module, student: nn.Module, layer: int, split) -> int:
    """The teacher's attention-head count, reduced to a divisor of every split projection width of both models."""
    heads = int(getattr(teacher.config, "num_attention_heads", 1))
    widths = [getattr(decoder_layers(m)[layer].self_attn, f"{p}_proj").out_features
              for m in (teacher, student) for p in split]
    g = 0
    for w in widths:
        g = math.gcd(g, w)
    return math.gcd(heads, g)


@contextlib.contextmanager
def capture(model: nn.Module, layer: int | None = None, split=("q", "k", "v")):
    """Capture the decoder's last hidden state (``store["hidden"]``) and, if ``layer`` is given, the outputs of that
    layer's ``<p>_proj`` for p in ``split`` (``store["q"]``...), with forward hooks removed on exit."""
    store, handles = {}, []
    decoder = model.get_decoder()

    def keep_hidden(_module, _inputs, output):
        store["hidden"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    handles.append(decoder.register_forward_hook(keep_hidden))
    if layer is not None:
        attn = decoder_layers(model)[layer].self_attn
        for p in split:
            handles.append(getattr(attn, f"{p}_proj").register_forward_hook(
                lambda _m, _i, out, p=p: store.__setitem__(p, out)))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def causal_lm_loss(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """Next-token cross-entropy on the labelled tokens (stages sft, bitnet-sft, pretrain)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
    return {"loss": loss, "ce": loss.detach()}


def bitdistill_loss(student: nn.Module, teacher: nn.Module, batch: dict, cfg: DistillConfig,
                    backend: str | None = None, loss_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Stage 3 loss ``CE + lambda*LD + gamma*AD`` (see the module docstring); returns total and its parts.

    ``student`` may be wrapped (DDP): it is called through its own forward so gradients synchronize; ``teacher``
    is frozen and run without gradients. ``loss_dtype`` is the dtype of hidden states and LM-head weights fed to
    the logits loss (default the student's hidden dtype).
    """
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    inner = student.module if hasattr(student, "module") else student
    split = tuple(cfg.ad_split)
    ad_layer = cfg.ad_layer if cfg.gamma_ad else None
    with torch.no_grad(), capture(teacher, ad_layer, split) as t_store:
        teacher.get_decoder()(input_ids=ids, attention_mask=mask)
    with capture(inner, ad_layer, split) as s_store:
        student(input_ids=ids, attention_mask=mask, logits_to_keep=1)  # only the last position's logits
    h_s, h_t = s_store["hidden"][:, :-1], t_store["hidden"][:, :-1]
    next_labels = labels[:, 1:]
    if cfg.kd_positions not in ("all", "answer"):
        raise ValueError(f"kd_positions must be 'all' or 'answer', got {cfg.kd_positions!r}")
    answer = next_labels != IGNORE_INDEX
    rows = (mask[:, 1:].bool() | answer) if cfg.kd_positions == "all" else answer
    if not bool(answer.any()):
        raise ValueError("the batch has no answer tokens (all labels are -100): nothing to learn")
    dtype = loss_dtype or h_s.dtype
    w_s = inner.get_output_embeddings().weight
    w_t = teacher.get_output_embeddings().weight
    if w_s.shape[0] != w_t.shape[0]:
        raise ValueError(f"teacher and student vocabularies differ ({w_t.shape[0]} vs {w_s.shape[0]} rows in the "
                         "LM heads): distill between models that share one tokenizer")
    # The fused op averages KD over the rows that have a label; "all" adds the prompt rows through a second,
    # label-free call, each call weighted by its share of rows so that LD is the mean over all chosen rows.
    common = dict(temperature=cfg.temperature, ignore_index=IGNORE_INDEX, chunk_size=cfg.chunk_size, backend=backend)
    w_s, w_t = w_s.to(dtype), w_t.to(dtype)
    n_answer, n_rows = int(answer.sum()), int(rows.sum())
    total, ld, ce = fused_linear_distill_loss(h_s[answer].to(dtype), w_s, h_t[answer].to(dtype), w_t,
                                              next_labels[answer], alpha_kd=cfg.lambda_ld * n_answer / n_rows,
                                              alpha_ce=1.0, **common)
    ld = ld * n_answer / n_rows
    rest = rows & ~answer
    if bool(rest.any()):
        n_rest = int(rest.sum())
        total_rest, ld_rest, _ = fused_linear_distill_loss(h_s[rest].to(dtype), w_s, h_t[rest].to(dtype), w_t, None,
                                                           alpha_kd=cfg.lambda_ld * n_rest / n_rows, alpha_ce=0.0,
                                                           **common)
        total, ld = total + total_rest, ld + ld_rest * n_rest / n_rows
    out = {"ce": ce.detach(), "ld": ld.detach()}
    if cfg.gamma_ad:
        heads = cfg.relation_heads or default_relation_heads(teacher, inner, cfg.ad_layer, split)
        ad = attention_relation_distill_loss(
            tuple(t_store[p].to(dtype) for p in split), tuple(s_store[p].to(dtype) for p in split), heads,
            attention_mask=mask, causal=cfg.ad_causal, backend=backend)
        total = total + cfg.gamma_ad * ad
        out["ad"] = ad.detach()
    out["loss"] = total
    return out

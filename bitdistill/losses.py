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
from .hf_layout import decoder_layers


@dataclass
class DistillConfig:
    lambda_ld: float = 10.0         # weight of the logits-distillation KL
    gamma_ad: float = 1e5           # weight of the attention-relation distillation
    temperature: float = 5.0        # tau of the logits KL (the loss is multiplied by tau^2)
    ad_layer: int = -1              # which decoder layer's q/k/v to distill (negative counts from the end)
    relation_heads: int | None = 32     # relation heads (the authors' split_head_number); None: the teacher's
                                        # attention heads, reduced to divide every q/k/v width
    ad_split: tuple = ("q", "k", "v")   # which projections give relations (MiniLM-v2: Q-Q, K-K, V-V)
    ad_causal: bool = False         # mask relations to j <= i (False: all non-padding pairs, as MiniLM-v2)
    # How the relation loss is scaled. gamma = 1e5 (the paper's) is only meaningful with the scaling it was tuned
    # with, which the paper's text does not give and the authors' code does: cosine relations (each head's vectors
    # L2-normalised, logits in [-1, 1]) and the Q, K, V KLs summed then divided by (layers x relation heads).
    ad_relation: str = "cosine"     # "cosine" (authors' code) or "scaled_dot": softmax(A A^T / sqrt(d_r)) (paper text)
    ad_reduction: str = "sum_over_heads"  # "sum_over_heads": sum of the Q/K/V KLs / (1 layer x R) (authors' code);
                                          # "mean": mean of the Q/K/V KLs
    ad_mask_padding: bool = True    # padded positions are neither queries nor keys (the authors' code keeps them,
                                    # so a sequence's loss depends on the batch's padding: a deviation kept on purpose)
    kd_positions: str = "all"       # LD rows: "all" non-padding next-token positions, or "answer" (CE rows only)
    chunk_size: int | None = None   # rows per chunk of the fused logits KD (None: the kernel's choice)

    def __post_init__(self):
        for key, value, allowed in (("ad_relation", self.ad_relation, AD_RELATIONS),
                                    ("ad_reduction", self.ad_reduction, AD_REDUCTIONS),
                                    ("kd_positions", self.kd_positions, ("all", "answer"))):
            if value not in allowed:
                raise ValueError(f"distill.{key} must be one of {allowed}, got {value!r}")
        for key in ("lambda_ld", "gamma_ad"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"distill.{key} must be a finite number >= 0, got {value!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature > 0):
            raise ValueError(f"distill.temperature must be a finite number > 0, got {self.temperature!r}")
        if self.relation_heads is not None and (isinstance(self.relation_heads, bool)
                                                or not isinstance(self.relation_heads, int) or self.relation_heads < 1):
            raise ValueError(f"distill.relation_heads must be a positive integer or null, got {self.relation_heads!r}")
        self.ad_split = tuple(self.ad_split)
        if not self.ad_split or not set(self.ad_split) <= {"q", "k", "v"} or len(set(self.ad_split)) != len(
                self.ad_split):
            raise ValueError(f"distill.ad_split must be a non-empty subset of [q, k, v], got {list(self.ad_split)}")


AD_RELATIONS = ("cosine", "scaled_dot")
AD_REDUCTIONS = ("sum_over_heads", "mean")


# ------------------------------------------------------------------------------------------------ model plumbing

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
        ad = relation_distill_loss(tuple(t_store[p] for p in split), tuple(s_store[p] for p in split), heads, cfg,
                                   mask, dtype, backend)
        total = total + cfg.gamma_ad * ad
        out["ad"] = ad.detach()
    out["loss"] = total
    return out


def relation_features(a: torch.Tensor, heads: int, relation: str) -> torch.Tensor:
    """[B, L, D] activations prepared for the relation op, which forms softmax(A_h A_h^T / sqrt(d_r)) per head.
    "cosine": each head's vectors are L2-normalised and scaled by d_r^(1/4), so the op's logits are the cosines."""
    if relation == "scaled_dot":
        return a
    b, l, d = a.shape
    if d % heads:
        raise ValueError(f"a width of {d} features does not split into {heads} relation heads: set "
                         "distill.relation_heads to a divisor of every q/k/v width of teacher and student")
    d_r = d // heads
    unit = F.normalize(a.float().reshape(b, l, heads, d_r), dim=-1, eps=1e-12)
    return (unit * d_r ** 0.25).reshape(b, l, d).to(a.dtype)


def relation_distill_loss(qkv_teacher, qkv_student, heads: int, cfg: DistillConfig,
                          attention_mask: torch.Tensor | None, dtype: torch.dtype | None = None,
                          backend: str | None = None) -> torch.Tensor:
    """L_AD on one layer, scaled as ``cfg.ad_relation`` / ``ad_reduction`` / ``ad_mask_padding`` say.

    The op's KL of a relation is the mean over real queries and relation heads of KL summed over keys, i.e. the
    authors' ``kl_div(..., reduction="batchmean")`` over [B * R * L, L] rows. "sum_over_heads" then sums over Q, K,
    V and divides by (layers x R) = R, as their trainer does; "mean" averages over Q, K, V.
    """
    prepare = (lambda a: relation_features(a.to(dtype) if dtype else a, heads, cfg.ad_relation))
    teacher = tuple(prepare(a) for a in qkv_teacher)
    student = tuple(prepare(a) for a in qkv_student)
    mask = attention_mask if cfg.ad_mask_padding else None
    mean = attention_relation_distill_loss(teacher, student, heads, attention_mask=mask, causal=cfg.ad_causal,
                                           backend=backend)
    return mean * len(teacher) / heads if cfg.ad_reduction == "sum_over_heads" else mean

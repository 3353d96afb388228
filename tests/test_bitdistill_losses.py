"""Stage 3 loss composition L = CE + lambda*LD + gamma*AD against a hand computation on tiny models."""
import math

import pytest
import torch

pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, Qwen3Config  # noqa: E402

from bitdistill.convert import convert_to_bitnet  # noqa: E402
from bitdistill.losses import DistillConfig, bitdistill_loss, default_relation_heads, relation_distill_loss  # noqa: E402,E501

IGNORE = -100


def tiny(seed, heads=4, kv=2, hidden=32):
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=64, hidden_size=hidden, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=8, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg)


def batch():
    torch.manual_seed(3)
    ids = torch.randint(1, 64, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0                     # right padding
    labels = torch.full_like(ids, IGNORE)
    labels[0, 4:] = ids[0, 4:]          # answers: the last tokens
    labels[1, 3:5] = ids[1, 3:5]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def projections(model, layer, ids, mask):
    out, handles = {}, []
    attn = model.model.layers[layer].self_attn
    for p in "qkv":
        handles.append(getattr(attn, f"{p}_proj").register_forward_hook(
            lambda _m, _i, o, p=p: out.__setitem__(p, o)))
    logits = model(input_ids=ids, attention_mask=mask).logits
    for h in handles:
        h.remove()
    return logits, out


def hand_loss(student, teacher, b, cfg, heads):
    """Every term written out with explicit loops (float64)."""
    ids, mask, labels = b["input_ids"], b["attention_mask"], b["labels"]
    zs, qs = projections(student, cfg.ad_layer, ids, mask)
    with torch.no_grad():
        zt, qt = projections(teacher, cfg.ad_layer, ids, mask)
    zs, zt = zs.double(), zt.double()
    tau = cfg.temperature
    ce_terms, kd_terms = [], []
    for bi in range(ids.shape[0]):
        for i in range(ids.shape[1] - 1):
            target = labels[bi, i + 1].item()
            if target != IGNORE:
                ce_terms.append(-torch.log_softmax(zs[bi, i], -1)[target])
            if (mask[bi, i + 1] == 1 and cfg.kd_positions == "all") or target != IGNORE:
                pt = torch.softmax(zt[bi, i] / tau, -1)
                kd_terms.append((pt * (pt.log() - torch.log_softmax(zs[bi, i] / tau, -1))).sum() * tau ** 2)
    ce, ld = sum(ce_terms) / len(ce_terms), sum(kd_terms) / len(kd_terms)
    ad_parts = []
    for p in cfg.ad_split:
        a_t, a_s = qt[p].double(), qs[p].double()
        total, count = 0.0, 0
        for bi in range(ids.shape[0]):
            valid = mask[bi].bool()
            for r in range(heads):
                dt, ds = a_t.shape[-1] // heads, a_s.shape[-1] // heads
                xt = a_t[bi, valid, r * dt:(r + 1) * dt]
                xs = a_s[bi, valid, r * ds:(r + 1) * ds]
                pt = torch.softmax(xt @ xt.T / math.sqrt(dt), -1)
                log_ps = torch.log_softmax(xs @ xs.T / math.sqrt(ds), -1)
                total = total + (pt * (pt.log() - log_ps)).sum()
                count += int(valid.sum())
        ad_parts.append(total / count)
    ad = sum(ad_parts) / len(ad_parts)
    return ce + cfg.lambda_ld * ld + cfg.gamma_ad * ad, ce, ld, ad


@pytest.mark.parametrize("kd_positions", ["all", "answer"])
@pytest.mark.parametrize("backend", ["torch", None], ids=["reference", "kernels"])
def test_distill_loss_matches_hand_computation(kd_positions, backend):
    teacher = tiny(0).eval()
    teacher.requires_grad_(False)
    student = convert_to_bitnet(tiny(1, heads=2, kv=1, hidden=16), backend=backend)  # different head counts
    cfg = DistillConfig(lambda_ld=10.0, gamma_ad=100.0, temperature=2.0, ad_layer=-1, relation_heads=2,
                        kd_positions=kd_positions, ad_relation="scaled_dot", ad_reduction="mean")
    b = batch()
    got = bitdistill_loss(student, teacher, b, cfg, backend=backend)
    want, ce, ld, ad = hand_loss(student, teacher, b, cfg, heads=2)
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["ce"].double(), ce.detach(), **tol)
    torch.testing.assert_close(got["ld"].double(), ld.detach(), **tol)
    torch.testing.assert_close(got["ad"].double(), ad.detach(), **tol)
    torch.testing.assert_close(got["loss"].double(), want.detach(), **tol)
    # gradients of the composed loss equal those of the hand computation
    params = [p for p in student.parameters() if p.requires_grad]
    g_got = torch.autograd.grad(got["loss"], params, allow_unused=True)
    g_want = torch.autograd.grad(want, params, allow_unused=True)
    for a, w in zip(g_got, g_want):
        if w is None:
            assert a is None or a.abs().max() == 0
        else:
            torch.testing.assert_close(a.double(), w.double(), rtol=2e-3, atol=1e-6)


def test_gamma_zero_skips_attention_distillation():
    teacher, student = tiny(0).eval(), convert_to_bitnet(tiny(1))
    out = bitdistill_loss(student, teacher, batch(), DistillConfig(gamma_ad=0.0, temperature=1.0), backend="torch")
    assert "ad" not in out
    torch.testing.assert_close(out["loss"], out["ce"] + 10.0 * out["ld"], rtol=1e-5, atol=1e-6)


def test_vocab_mismatch_is_a_clear_error():
    teacher = tiny(0)
    torch.manual_seed(1)
    other = AutoModelForCausalLM.from_config(Qwen3Config(vocab_size=70, hidden_size=32, intermediate_size=48,
                                                         num_hidden_layers=2, num_attention_heads=4,
                                                         num_key_value_heads=2, head_dim=8))
    with pytest.raises(ValueError, match="vocabularies differ"):
        bitdistill_loss(convert_to_bitnet(other), teacher, batch(), DistillConfig(), backend="torch")


def test_default_relation_heads_divide_every_width():
    teacher, student = tiny(0, heads=4, kv=2), tiny(1, heads=2, kv=1, hidden=16)
    # widths: teacher q 32, k/v 16; student q 16, k/v 8 -> gcd with 4 heads is 4
    assert default_relation_heads(teacher, student, -1, ("q", "k", "v")) == 4
    assert default_relation_heads(tiny(0, heads=6, kv=2, hidden=48), student, -1, ("q", "k", "v")) == 2


# ------------------------------------------------------------------ L_AD scaled as the authors' code (gamma = 1e5)

def authors_relation_loss(qkv_t, qkv_s, heads, layers=1):
    """The authors' trainer (yushuiwx/bitnet-distill, CustomDistillSeq2SeqTrainer): per head, cosine relations
    (F.normalize, no 1/sqrt(d)), softmax, probabilities clamped at 1e-8, kl_div batchmean over [B*R*L, L] rows;
    the Q, K, V terms summed and divided by (layers x split heads)."""
    total = 0.0
    for t, s in zip(qkv_t, qkv_s):
        b, l, _ = s.shape
        rel = []
        for a in (s, t):
            a = torch.nn.functional.normalize(a.double().reshape(b, l, heads, -1).transpose(1, 2), p=2, dim=-1)
            rel.append(torch.softmax((a @ a.transpose(-1, -2)).reshape(-1, l), dim=-1).clamp(min=1e-8))
        total = total + torch.nn.functional.kl_div(torch.log(rel[0]), rel[1], reduction="batchmean")
    return total / (layers * heads)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_relation_loss_equals_the_authors_code(backend, device):
    torch.manual_seed(0)
    b, l, heads = 2, 7, 4
    qkv_t = [torch.randn(b, l, w, device=device) for w in (32, 16, 16)]        # teacher q, k, v widths
    qkv_s = [torch.randn(b, l, w, device=device, requires_grad=True) for w in (16, 8, 8)]  # a narrower student
    got = relation_distill_loss(qkv_t, qkv_s, heads, DistillConfig(), attention_mask=None, backend=backend)
    want = authors_relation_loss(qkv_t, qkv_s, heads)
    torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=1e-9)  # their 1e-8 clamp: ~1e-7 relative here
    g_got = torch.autograd.grad(got, qkv_s)
    g_want = torch.autograd.grad(want, qkv_s)
    for a, w in zip(g_got, g_want):
        torch.testing.assert_close(a.double(), w.double(), rtol=2e-3, atol=1e-9)


def test_relation_loss_on_a_hand_computed_example():
    # one relation head, L = 2: teacher rows e0, e1 (cosines [[1, 0], [0, 1]]); student rows e0 and (e0 + e1)/sqrt2
    # (cosines [[1, c], [c, 1]], c = 1/sqrt2). Both query rows give the same KL by symmetry.
    c = 1 / math.sqrt(2)
    p = [math.e / (math.e + 1), 1 / (math.e + 1)]
    q = [math.e / (math.e + math.exp(c)), math.exp(c) / (math.e + math.exp(c))]
    kl_row = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    teacher = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    student = torch.tensor([[[1.0, 0.0], [c, c]]])
    qkv = lambda a: (a, a, a)  # noqa: E731
    authors = relation_distill_loss(qkv(teacher), qkv(student), 1, DistillConfig(), None, backend="torch")
    assert abs(float(authors) - 3 * kl_row / 1) < 1e-6      # Q + K + V, divided by 1 layer x 1 head
    mean = relation_distill_loss(qkv(teacher), qkv(student), 1, DistillConfig(ad_reduction="mean"), None,
                                 backend="torch")
    assert abs(float(mean) - kl_row) < 1e-6
    # the paper's text: softmax(A A^T / sqrt(d_r)), d_r = 2, on the raw (here unit) vectors
    p2 = [1 / (1 + math.exp(-1 / math.sqrt(2))), 1 - 1 / (1 + math.exp(-1 / math.sqrt(2)))]
    z = [1 / math.sqrt(2), c / math.sqrt(2)]
    q2 = [math.exp(z[0]) / (math.exp(z[0]) + math.exp(z[1])), math.exp(z[1]) / (math.exp(z[0]) + math.exp(z[1]))]
    kl2 = sum(pi * math.log(pi / qi) for pi, qi in zip(p2, q2))
    dot = relation_distill_loss(qkv(teacher), qkv(student), 1,
                                DistillConfig(ad_relation="scaled_dot", ad_reduction="mean"), None, backend="torch")
    assert abs(float(dot) - kl2) < 1e-6


@pytest.mark.parametrize("bad, match", [({"ad_relation": "dot"}, "ad_relation"), ({"ad_reduction": "sum"},
                                        "ad_reduction"), ({"gamma_ad": -1.0}, "gamma_ad"),
                                        ({"temperature": 0.0}, "temperature"), ({"relation_heads": 0},
                                        "relation_heads"), ({"ad_split": ("q", "x")}, "ad_split")])
def test_distill_config_refuses_bad_settings(bad, match):
    with pytest.raises(ValueError, match=match):
        DistillConfig(**bad)

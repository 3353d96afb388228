"""Logits distillation: Triton ops (interpreter on CPU, realistic shapes on GPU) against the float64 reference."""
import pytest
import torch

import bitkernels as bk
import bitkernels.reference as ref
from bitkernels.ops import distill_loss as ops_dl

# (loss rtol, gradient relative-norm tol) for inputs of each dtype, against float64 math on the same (rounded) inputs.
# Low-precision errors come from the logits GEMMs rounding to the input dtype and the gradient logits stored in it.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (3e-3, 5e-3), torch.bfloat16: (2e-2, 3e-2)}
DTYPES = list(TOL)


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_inputs(n_shape, h_s, h_t, vocab, dtype, device, ignore_frac=0.25, bias=False, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(device=device, dtype=dtype)

    n_shape = tuple(n_shape) if isinstance(n_shape, (tuple, list)) else (n_shape,)
    n = torch.Size(n_shape).numel()
    hs = rnd(*n_shape, h_s)
    ws = rnd(vocab, h_s, s=scale * 2.0 / h_s ** 0.5)
    ht = rnd(*n_shape, h_t)
    wt = rnd(vocab, h_t, s=scale * 2.0 / h_t ** 0.5)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignore_frac] = -100
    labels = labels.view(n_shape).to(device)
    bs = rnd(vocab, s=0.5) if bias else None
    return hs, ws, ht, wt, labels, bs


def fused_vs_reference(hs, ws, ht, wt, labels, bs=None, tau=1.0, alpha_kd=1.0, alpha_ce=1.0, chunk_size=None,
                       dtype=torch.float32, grad_tol=None):
    """Run the Triton op on the inputs and the reference on float64 copies; assert losses and grads match."""
    loss_tol, grad_tol = TOL[dtype][0], grad_tol or TOL[dtype][1]
    leaves = [t.detach().clone().requires_grad_() for t in (hs, ws) + ((bs,) if bs is not None else ())]
    out = ops_dl.fused_linear_distill_loss(leaves[0], leaves[1], ht, wt, labels, tau, alpha_kd, alpha_ce,
                                           chunk_size=chunk_size, b_student=leaves[2] if bs is not None else None)
    out[0].backward()
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    expect = ref.fused_linear_distill_loss(ref_leaves[0], ref_leaves[1], ht.double(), wt.double(), labels, tau,
                                           alpha_kd, alpha_ce,
                                           b_student=ref_leaves[2] if bs is not None else None)
    expect[0].backward()
    for got, exp in zip(out, expect):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), exp, rtol=loss_tol, atol=loss_tol * 1e-2)
    for leaf, ref_leaf in zip(leaves, ref_leaves):
        assert leaf.grad.dtype == leaf.dtype and leaf.grad.shape == leaf.shape
        assert torch.isfinite(leaf.grad).all()
        assert rel_err(leaf.grad, ref_leaf.grad) < grad_tol, (rel_err(leaf.grad, ref_leaf.grad), grad_tol)
    return out


# ------------------------------------------------------------------------------------------------- fused op

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tau", [1.0, 2.0, 5.0, 10.0])
def test_fused_matches_fp64_reference(tau, dtype, device):
    # V=1000 is not a multiple of the 1024-wide tiles; 7 tokens in chunks of 3 leave a ragged last chunk.
    inputs = make_inputs(7, 16, 24, 1000, dtype, device, bias=dtype == torch.float32, seed=int(tau))
    fused_vs_reference(*inputs, tau=tau, alpha_kd=0.7, alpha_ce=1.3, chunk_size=3, dtype=dtype)


@pytest.mark.parametrize("n_shape,h_s,h_t,vocab,chunk", [
    (1, 8, 8, 37, None),          # one token
    ((2, 3), 12, 20, 300, 4),     # [B, T, H] tokens, teacher wider than student
    (5, 24, 8, 5000, 2),          # several tiles per row, teacher narrower
    (9, 16, 16, 17, 9),           # one chunk holding every token
])
def test_fused_shapes(n_shape, h_s, h_t, vocab, chunk, device):
    inputs = make_inputs(n_shape, h_s, h_t, vocab, torch.float32, device, seed=vocab)
    fused_vs_reference(*inputs, tau=2.0, chunk_size=chunk)


def test_fused_without_labels_is_kd_over_all_tokens(device):
    hs, ws, ht, wt, _, _ = make_inputs(6, 16, 16, 700, torch.float32, device, seed=3)
    total, kd, ce = fused_vs_reference(hs, ws, ht, wt, None, tau=3.0, alpha_kd=2.0, chunk_size=4)
    assert ce.item() == 0.0
    torch.testing.assert_close(total, 2.0 * kd)
    # the same KD as distill_kl on the materialized logits
    torch.testing.assert_close(kd, ref.distill_kl(hs @ ws.T, ht @ wt.T, 3.0), rtol=1e-5, atol=1e-7)


def test_fused_ignored_tokens_count_in_neither_mean(device):
    hs, ws, ht, wt, labels, _ = make_inputs(8, 16, 16, 500, torch.float32, device, ignore_frac=0.0, seed=5)
    labels[::2] = -100
    _, kd, ce = ops_dl.fused_linear_distill_loss(hs, ws, ht, wt, labels, 2.0, chunk_size=3)
    keep = labels != -100
    _, kd_kept, ce_kept = ref.fused_linear_distill_loss(hs[keep], ws, ht[keep], wt, labels[keep], 2.0)
    torch.testing.assert_close(kd, kd_kept, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ce, ce_kept, rtol=1e-5, atol=1e-7)


def test_fused_all_tokens_ignored_gives_zero_not_nan(device):
    hs, ws, ht, wt, labels, _ = make_inputs(4, 8, 8, 100, torch.float32, device, seed=6)
    labels.fill_(-100)
    hs.requires_grad_()
    ws.requires_grad_()
    total, kd, ce = ops_dl.fused_linear_distill_loss(hs, ws, ht, wt, labels, 2.0, chunk_size=3)
    total.backward()
    assert total.item() == 0.0 and kd.item() == 0.0 and ce.item() == 0.0
    assert hs.grad.abs().max().item() == 0.0 and ws.grad.abs().max().item() == 0.0


def test_fused_zero_tokens(device):
    hs, ws, ht, wt, labels, bs = make_inputs(0, 8, 8, 40, torch.float32, device, bias=True)
    total, kd, ce = fused_vs_reference(hs, ws, ht, wt, labels, bs, tau=2.0)
    assert total.item() == 0.0


def test_fused_extreme_logits_stay_finite(device):
    # Logits of +-1e4: overflow in any unshifted exp. One-hot hidden states make the logits the weights' columns.
    n, h, v = 6, 8, 300
    g = torch.Generator().manual_seed(7)
    hs = torch.eye(h)[torch.arange(n) % h].to(device)
    ht = torch.eye(h)[(torch.arange(n) + 1) % h].to(device)
    ws = (torch.randint(-1, 2, (v, h), generator=g) * 1e4).float().to(device)
    wt = (torch.randint(-1, 2, (v, h), generator=g) * 1e4).float().to(device)
    labels = torch.randint(0, v, (n,), generator=g).to(device)
    for tau in (1.0, 5.0):
        fused_vs_reference(hs, ws, ht, wt, labels, tau=tau, chunk_size=4)


def test_fused_reports_are_detached_and_backward_runs_once(device):
    hs, ws, ht, wt, labels, _ = make_inputs(4, 8, 8, 64, torch.float32, device)
    hs.requires_grad_()
    for backend in ("triton", "torch"):
        total, kd, ce = bk.fused_linear_distill_loss(hs, ws, ht, wt, labels, 2.0, backend=backend)
        assert total.requires_grad and not kd.requires_grad and not ce.requires_grad
    total, _, _ = ops_dl.fused_linear_distill_loss(hs, ws, ht, wt, labels, 2.0)
    total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="single backward"):
        total.backward()


def test_fused_grad_output_scales_gradients(device):
    hs, ws, ht, wt, labels, _ = make_inputs(5, 8, 8, 90, torch.float32, device, seed=9)
    grads = []
    for factor in (1.0, -2.5):
        h = hs.clone().requires_grad_()
        w = ws.clone().requires_grad_()
        total, _, _ = ops_dl.fused_linear_distill_loss(h, w, ht, wt, labels, 2.0, chunk_size=2)
        (factor * total).backward()
        grads.append((h.grad, w.grad))
    torch.testing.assert_close(grads[1][0], -2.5 * grads[0][0])
    torch.testing.assert_close(grads[1][1], -2.5 * grads[0][1])


def test_fused_teacher_gets_no_gradient(device):
    hs, ws, ht, wt, labels, _ = make_inputs(4, 8, 8, 50, torch.float32, device)
    ht.requires_grad_()
    wt.requires_grad_()
    hs.requires_grad_()
    total, _, _ = ops_dl.fused_linear_distill_loss(hs, ws, ht, wt, labels, 2.0)
    total.backward()
    assert ht.grad is None and wt.grad is None and hs.grad is not None


def test_default_chunk_size():
    assert ops_dl.default_chunk_size(8192, 151936) % 128 == 0
    assert ops_dl.default_chunk_size(8192, 151936) * 151936 <= ops_dl.DEFAULT_CHUNK_ELEMENTS
    assert ops_dl.default_chunk_size(5, 151936) == 5
    assert ops_dl.default_chunk_size(10 ** 6, 10 ** 9) == 128


# ------------------------------------------------------------------------------------------------- distill_kl

def kl_vs_reference(s, t, tau, mask, dtype):
    loss_tol, grad_tol = TOL[dtype]
    s = s.detach().clone().requires_grad_()
    loss = ops_dl.distill_kl(s, t, tau, mask)
    dy = torch.tensor(1.7, device=s.device)
    (loss * dy).backward()
    s64 = s.detach().double().requires_grad_()
    expect = ref.distill_kl(s64, t.double(), tau, mask)
    (expect * 1.7).backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    # the kernel reads the given (rounded) logits and computes in float32: tight even for low precision
    torch.testing.assert_close(loss.double(), expect, rtol=1e-5, atol=1e-6)
    assert s.grad.dtype == s.dtype and s.grad.shape == s.shape
    assert rel_err(s.grad, s64.grad) < max(grad_tol, 1e-5) / 3, rel_err(s.grad, s64.grad)
    return loss, s.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tau", [1.0, 2.0, 5.0, 10.0])
def test_distill_kl_matches_fp64_reference(tau, dtype, device):
    g = torch.Generator().manual_seed(int(tau * 10))
    s = (torch.randn(3, 5, 1000, generator=g) * 3).to(device, dtype)
    t = (torch.randn(3, 5, 1000, generator=g) * 3).to(device, dtype)
    mask = (torch.rand(3, 5, generator=g) > 0.3).to(device)
    kl_vs_reference(s, t, tau, mask, dtype)


@pytest.mark.parametrize("shape", [(1, 1), (1, 37), (4, 4097), (2, 3, 129), (0, 50)])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_distill_kl_shapes_and_masks(shape, mask_kind, device):
    g = torch.Generator().manual_seed(sum(shape))
    s = torch.randn(shape, generator=g).to(device)
    t = torch.randn(shape, generator=g).to(device)
    mask = None
    if mask_kind is not None:
        mask = torch.rand(shape[:-1], generator=g) > 0.4
        mask = (mask if mask_kind == "bool" else mask.float()).to(device)
    if s.numel() == 0:
        s.requires_grad_()
        loss = ops_dl.distill_kl(s, t, 2.0, mask)
        loss.backward()
        assert loss.item() == 0.0 and s.grad.shape == s.shape
        return
    kl_vs_reference(s, t, 2.0, mask, torch.float32)


def test_distill_kl_extreme_logits_and_masked_rows(device):
    g = torch.Generator().manual_seed(11)
    s = (torch.randint(-1, 2, (4, 513), generator=g) * 1e4).float().to(device)
    t = (torch.randint(-1, 2, (4, 513), generator=g) * 1e4).float().to(device)
    mask = torch.tensor([True, False, True, True], device=device)
    loss, grad = kl_vs_reference(s, t, 1.0, mask, torch.float32)
    assert grad[1].abs().max().item() == 0.0  # a masked row gets exactly zero gradient
    # identical logits: KL is 0 and so is the gradient
    s.requires_grad_()
    same = ops_dl.distill_kl(s, s.detach(), 3.0)
    same.backward()
    assert abs(same.item()) < 1e-6 and s.grad.abs().max().item() < 1e-6


def test_distill_kl_non_contiguous_logits(device):
    base = torch.randn(6, 2 * 200, device=device)
    s = base[:, ::2]  # column stride 2: the op copies it to unit stride
    t = torch.randn(6, 200, device=device)
    kl_vs_reference(s, t, 2.0, None, torch.float32)


# ------------------------------------------------------------------------------------------ checked functional API

def test_functional_backends_agree(device):
    hs, ws, ht, wt, labels, _ = make_inputs((2, 3), 8, 12, 80, torch.float32, device)
    a = bk.fused_linear_distill_loss(hs, ws, ht, wt, labels, 2.0, 0.5, 1.5, backend="triton")
    b = bk.fused_linear_distill_loss(hs, ws, ht, wt, labels, 2.0, 0.5, 1.5, backend="torch")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    s, t = hs @ ws.T, ht @ wt.T
    mask = labels != -100
    torch.testing.assert_close(bk.functional.distill_kl(s, t, 2.0, mask, backend="triton"),
                               bk.functional.distill_kl(s, t, 2.0, mask, backend="torch"), rtol=1e-5, atol=1e-6)


def test_functional_errors_say_what_to_fix(device):
    hs, ws, ht, wt, labels, _ = make_inputs(4, 8, 12, 50, torch.float32, device)
    f = bk.fused_linear_distill_loss
    with pytest.raises(ValueError, match="vocab mismatch"):
        f(hs, ws, ht, wt[:49], labels)
    with pytest.raises(ValueError, match=r"w_teacher must be \[vocab, 12\]"):
        f(hs, ws, ht, wt[:, :8], labels)
    with pytest.raises(TypeError, match="must share a dtype"):
        f(hs.double(), ws, ht, wt, labels)
    with pytest.raises(ValueError, match="same number of tokens"):
        f(hs, ws, ht[:3], wt, labels)
    with pytest.raises(ValueError, match="labels must have h_student's shape"):
        f(hs, ws, ht, wt, labels[:3])
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        f(hs, ws, ht, wt, labels.float())
    bad = labels.clone()
    bad[0] = 50
    with pytest.raises(ValueError, match=r"outside \[0, 50\)"):
        f(hs, ws, ht, wt, bad)
    with pytest.raises(ValueError, match="temperature must be"):
        f(hs, ws, ht, wt, labels, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size must be"):
        f(hs, ws, ht, wt, labels, chunk_size=0)
    with pytest.raises(ValueError, match="b_student must have shape"):
        f(hs, ws, ht, wt, labels, b_student=torch.zeros(49, device=device))
    s, t = torch.randn(3, 10, device=device), torch.randn(3, 11, device=device)
    with pytest.raises(ValueError, match="same shape"):
        bk.distill_kl(s, t)
    with pytest.raises(ValueError, match="mask must have"):
        bk.distill_kl(s, s, mask=torch.ones(10, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match="temperature must be"):
        bk.distill_kl(s, s, temperature=-1.0)


# --------------------------------------------------------------------------------------------- realistic (GPU)

@pytest.mark.gpu
@pytest.mark.parametrize("n,h,chunk", [(4096, 1024, None), (8192, 2048, None), (3001, 1024, 1000)])
def test_fused_qwen_vocab_bf16(n, h, chunk, device):
    v = 151936
    hs, ws, ht, wt, labels, _ = make_inputs(n, h, h, v, torch.bfloat16, device, ignore_frac=0.1, seed=n)
    leaves = [hs.clone().requires_grad_(), ws.clone().requires_grad_()]
    out = ops_dl.fused_linear_distill_loss(*leaves, ht, wt, labels, 5.0, 10.0, 1.0, chunk_size=chunk)
    out[0].backward()
    # float32 reference on the same bf16 inputs (float64 logits would need 10 GB each)
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    exp = ref.fused_linear_distill_loss(*ref_leaves, ht.float(), wt.float(), labels, 5.0, 10.0, 1.0)
    exp[0].backward()
    for got, e in zip(out, exp):
        torch.testing.assert_close(got, e, rtol=2e-2, atol=1e-4)
    for leaf, rl in zip(leaves, ref_leaves):
        assert rel_err(leaf.grad, rl.grad) < 3e-2


@pytest.mark.gpu
def test_distill_kl_qwen_vocab_bf16(device):
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(2048, 151936, generator=g) * 4).to(device, torch.bfloat16)
    t = (torch.randn(2048, 151936, generator=g) * 4).to(device, torch.bfloat16)
    mask = torch.rand(2048, generator=g).to(device) > 0.1
    kl_vs_reference(s, t, 5.0, mask, torch.bfloat16)

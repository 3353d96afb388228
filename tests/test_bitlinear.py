"""BitLinear: the int8 tensor-core op vs the fake-quantized reference, and the module as a drop-in nn.Linear."""
import pytest
import torch
import torch.nn as nn

import bitkernels as bk
from bitkernels import BitLinear, reference as ref, replace_linear

ops = pytest.importorskip("bitkernels.ops")

# Forward: ours accumulates exactly and rounds once; the reference rounds its bf16/fp16 matmul. Gradients: same GEMMs.
FWD_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make(shape_x, n, dtype, device, bias=True, subln=True):
    k = shape_x[-1]
    x = torch.randn(*shape_x, device=device, dtype=dtype)
    w = torch.randn(n, k, device=device, dtype=dtype) * k ** -0.5
    b = torch.randn(n, device=device, dtype=dtype) if bias else None
    nw = (torch.rand(k, device=device, dtype=dtype) + 0.5) if subln else None
    return [t.requires_grad_() if t is not None else None for t in (x, w, b, nw)]


def clone(ts):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in ts]


def exact_forward(x, w, b, nw, per_channel, quant=ref):
    """fp64 product of ``quant``'s codes (the reference's, or ``ops`` for the kernels' own): what an exact int8 GEMM
    must produce from them."""
    k = x.shape[-1]
    xc, xs = quant.quantize_activations_int8(x) if nw is None else quant.rmsnorm_quantize_int8(x, nw)
    wc, ws = quant.ternarize_absmean(w, per_channel)
    y = (xc.reshape(-1, k).double() @ wc.double().t()) * xs.reshape(-1, 1).double() \
        * (ws.double() if per_channel else ws.double())
    y = y + (0 if b is None else b.double())
    return y.reshape(*x.shape[:-1], w.shape[0])


@pytest.mark.parametrize("shape_x,n", [((1, 33), 17), ((3, 40), 24), ((2, 5, 67), 45), ((0, 16), 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("subln,per_channel,bias", [(True, False, True), (False, True, False)])
def test_bitlinear_forward_and_grads_vs_reference(device, shape_x, n, dtype, subln, per_channel, bias):
    ts = make(shape_x, n, dtype, device, bias, subln)
    ours_in, ref_in = clone(ts), clone(ts)
    y = bk.bitlinear(ours_in[0], ours_in[1], ours_in[2], ours_in[3], 1e-6, per_channel, backend="triton",
                     save_input=True)
    yr = ref.bitlinear(*ref_in, 1e-6, per_channel)
    assert y.dtype == dtype and y.shape == yr.shape
    if y.numel() == 0:
        return
    # Our codes through an exact GEMM: one rounding of the output away, at most the dtype's unit roundoff (bf16:
    # 2^-8, which a few-element output can reach). The reference's codes may differ by a step where a scale's float
    # sum, in another order, crosses a rounding boundary: the next check covers that.
    detached = [t.detach() if t is not None else None for t in ts]
    one_rounding = max(FWD_TOL[dtype] / 4, 1.01 * torch.finfo(dtype).eps / 2)
    assert rel(y, exact_forward(*detached, per_channel, quant=ops)) <= one_rounding
    assert rel(y, yr) <= FWD_TOL[dtype]
    dy = torch.randn_like(y)
    y.backward(dy)
    yr.backward(dy)
    for name, a, b in zip(("x", "weight", "bias", "norm_weight"), ours_in, ref_in):
        if a is not None:
            assert a.grad is not None and a.grad.dtype == a.dtype, name
            assert rel(a.grad, b.grad) <= GRAD_TOL[dtype], name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_subln_backward_from_int8_codes(device, dtype):
    # save_input=False rebuilds x*rstd from the codes: x's and the norm weight's gradients carry the int8 rounding
    # (about 1/254 of each row's absmax); weight and bias gradients stay exact.
    ts = make((64, 96), 40, dtype, device)
    ours_in, ref_in = clone(ts), clone(ts)
    y = bk.bitlinear(*ours_in, backend="triton", save_input=False)
    yr = ref.bitlinear(*ref_in)
    dy = torch.randn_like(y)
    y.backward(dy)
    yr.backward(dy)
    assert rel(ours_in[0].grad, ref_in[0].grad) <= 1e-2
    assert rel(ours_in[3].grad, ref_in[3].grad) <= 3e-2
    assert rel(ours_in[1].grad, ref_in[1].grad) <= GRAD_TOL[dtype]
    assert rel(ours_in[2].grad, ref_in[2].grad) <= GRAD_TOL[dtype]


@pytest.mark.parametrize("save_input", [True, False])
def test_weight_gradient_alone_equals_full_backward(device, save_input):
    # x and the SubLN weight frozen, W trained: the backward takes another path to W's GEMM operand, and must give
    # the same W (and bias) gradient bit for bit as when every gradient is asked for.
    ts = make((2, 9, 40), 24, torch.float32, device)
    full, alone = clone(ts), [t.detach().clone() for t in ts]
    for i in (1, 2):
        alone[i].requires_grad_()
    dy = torch.randn(2, 9, 24, device=device)
    bk.bitlinear(*full, backend="triton", save_input=save_input).backward(dy)
    bk.bitlinear(*alone, backend="triton", save_input=save_input).backward(dy)
    assert alone[0].grad is None and alone[3].grad is None
    torch.testing.assert_close(alone[1].grad, full[1].grad, rtol=0, atol=0)
    torch.testing.assert_close(alone[2].grad, full[2].grad, rtol=0, atol=0)


def _saved(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn()
    return saved


@pytest.mark.parametrize("subln,save_input,keeps", [(False, True, "codes"), (True, False, "codes"),
                                                    (True, True, "x")])
def test_saved_for_backward(device, subln, save_input, keeps):
    # Never both x and its codes: without SubLN (or save_input=False) only the int8 codes, else only x.
    x, w, b, nw = make((8, 32), 16, torch.bfloat16, device, subln=subln)
    saved = _saved(lambda: bk.bitlinear(x, w, b, nw, backend="triton", save_input=save_input))
    has_x = any(t.dtype == torch.bfloat16 and t.shape == x.shape for t in saved)
    has_codes = any(t.dtype == torch.int8 and t.shape == x.shape for t in saved)
    assert (has_x, has_codes) == ((True, False) if keeps == "x" else (False, True))


def test_weight_codes_cached_until_weight_changes(device, monkeypatch):
    import importlib

    op_mod = importlib.import_module("bitkernels.ops.bitlinear")  # the module, not ops.bitlinear the function

    calls = []  # new codes come from either op (per tensor: in the launch that quantizes x)
    for name in ("ternarize_absmean", "ternarize_and_quantize_forward"):
        monkeypatch.setattr(op_mod, name, lambda *a, real=getattr(op_mod, name): calls.append(1) or real(*a))
    layer = BitLinear(32, 16, subln=True, backend="triton").to(device)
    x = torch.randn(4, 32, device=device)
    y1 = layer(x)
    layer(x).sum().backward()  # same weight version: a micro-step reuses the codes
    assert len(calls) == 1
    with torch.no_grad():
        layer.weight.mul_(-1)  # what an optimizer step does: in place, version bumped
    y2 = layer(x)
    assert len(calls) == 2
    assert not torch.allclose(y1, y2)
    layer.load_state_dict({k: v.clone() for k, v in layer.state_dict().items()})
    layer(x)
    assert len(calls) == 3


@pytest.mark.parametrize("subln,save_input", [(True, True), (True, False), (False, True)])
def test_new_codes_and_cached_codes_give_the_same_step(device, subln, save_input):
    # A forward that makes the weight's codes quantizes x in the same launch (ternarize_and_quantize); one that
    # finds them cached quantizes x alone. Same output and gradients, bit for bit.
    ts = make((2, 7, 48), 40, torch.bfloat16, device, bias=True, subln=subln)
    cache: dict = {}
    runs = []
    for _ in range(2):  # the first call fills the cache, the second hits it
        x, _, b, nw = clone(ts)
        y = bk.bitlinear(x, ts[1], b, nw, backend="triton", weight_cache=cache, save_input=save_input)
        y.backward(torch.ones_like(y))
        runs.append([y] + [t.grad for t in (x, ts[1], b, nw) if t is not None])
        ts[1].grad = None
    assert "entry" in cache
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("optimizer", ["adamw_fused", "adamw_foreach", "sgd"])
def test_cached_codes_follow_every_optimizer_step(optimizer, device):
    # AdamW(fused=True) updates weights without bumping their version counters: codes cached by version alone went
    # stale, and the ternary weights of a training run never changed.
    torch.manual_seed(0)
    layer = BitLinear(32, 16, subln=True, backend="triton").to(device)
    make_opt = {"adamw_fused": lambda p: torch.optim.AdamW(p, lr=0.05, fused=True),
                "adamw_foreach": lambda p: torch.optim.AdamW(p, lr=0.05, foreach=True),
                "sgd": lambda p: torch.optim.SGD(p, lr=0.5)}[optimizer]
    opt = make_opt(layer.parameters())
    x = torch.randn(4, 32, device=device)
    for _ in range(3):
        layer(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
    fresh = BitLinear(32, 16, subln=True, backend="triton").to(device)
    fresh.load_state_dict(layer.state_dict())  # a new module: no cache
    with torch.no_grad():
        assert torch.equal(layer(x), fresh(x))


def test_module_is_a_drop_in_linear(device):
    torch.manual_seed(0)
    lin = nn.Linear(48, 24).to(device)
    bl = BitLinear(48, 24, subln=True, per_channel=True).to(device)
    assert isinstance(bl, nn.Linear)
    missing, unexpected = bl.load_state_dict(lin.state_dict(), strict=False)
    assert missing == ["subln.weight"] and unexpected == []
    assert set(bl.state_dict()) == {"weight", "bias", "subln.weight"}
    assert torch.equal(bl.weight, lin.weight)
    x = torch.randn(2, 3, 48, device=device)
    ref_y = ref.bitlinear(x, lin.weight, lin.bias, torch.ones(48, device=device), 1e-6, True)
    assert rel(bl(x), ref_y) <= 1e-5
    assert "subln=True" in repr(bl) and "per_channel" in repr(bl)


def test_from_linear_shares_parameters_and_replace_linear(device):
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8, bias=False)).to(device)
    w0 = model[0].weight
    names = replace_linear(model, filter=lambda name, m: name == "0", subln=True)
    assert names == ["0"] and isinstance(model[0], BitLinear) and not isinstance(model[2], BitLinear)
    assert model[0].weight is w0
    out = model(torch.randn(5, 16, device=device))
    out.sum().backward()
    assert w0.grad is not None and model[0].subln.weight.grad is not None


def test_backend_switch_same_values(device):
    layer = BitLinear(40, 24, subln=True).to(device)
    x = torch.randn(6, 40, device=device)
    layer.backend = "triton"
    y_triton = layer(x)
    layer.backend = "torch"
    y_torch = layer(x)
    assert rel(y_triton, y_torch) <= 1e-5
    layer.quantize = False
    layer.backend = None
    assert rel(layer(x), nn.functional.linear(layer.subln(x), layer.weight, layer.bias)) <= 1e-6


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_freeze_inference_mode(device, backend, per_channel):
    layer = BitLinear(40, 24, subln=True, per_channel=per_channel, backend=backend).to(device)
    with torch.no_grad():
        layer.subln.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 7, 40, device=device)
    with torch.no_grad():
        y_train = layer(x)
    layer.freeze()
    assert layer.frozen and layer.weight is None
    assert layer.weight_codes.dtype == torch.int8 and "weight" not in layer.state_dict()
    assert set(layer.state_dict()) == {"weight_codes", "weight_scale", "bias", "subln.weight"}
    assert rel(layer(x), y_train) <= 1e-5
    assert "frozen" in repr(layer)


def test_bad_inputs_raise_clear_errors(device):
    w = torch.randn(8, 16, device=device)
    with pytest.raises(ValueError, match="in_features=16"):
        bk.bitlinear(torch.randn(2, 15, device=device), w)
    with pytest.raises(ValueError, match="bias must have shape"):
        bk.bitlinear(torch.randn(2, 16, device=device), w, torch.randn(7, device=device))
    with pytest.raises(ValueError, match="norm_weight"):
        bk.bitlinear(torch.randn(2, 16, device=device), w, None, torch.ones(15, device=device))
    with pytest.raises(TypeError, match="floating"):
        bk.bitlinear(torch.randint(0, 3, (2, 16), device=device), w)
    with pytest.raises(TypeError, match="int8"):
        bk.functional.bitlinear_inference(torch.randn(2, 16, device=device), w, torch.ones((), device=device))
    with pytest.raises(RuntimeError, match="quantize=True"):
        BitLinear(16, 8, quantize=False).freeze()


@pytest.mark.gpu
@pytest.mark.parametrize("tokens,k,n", [(8192, 1024, 3072), (8192, 2560, 9728), (2048, 9728, 2560), (3, 2048, 6144)])
def test_bitlinear_realistic_shapes(device, tokens, k, n):
    ts = make((tokens, k), n, torch.bfloat16, device, bias=False)
    for save_input in (True, False):
        ours_in, ref_in = clone(ts), clone(ts)
        y = ops.bitlinear(ours_in[0], ours_in[1], None, ours_in[3], save_input=save_input)
        yr = ref.bitlinear(ref_in[0], ref_in[1], None, ref_in[3])
        assert rel(y, exact_forward(*[t.detach() if t is not None else None for t in ts], False)) <= 4e-3
        assert rel(y, yr) <= 1e-2
        dy = torch.randn_like(y)
        y.backward(dy)
        yr.backward(dy)
        assert rel(ours_in[1].grad, ref_in[1].grad) <= 1e-2
        assert rel(ours_in[0].grad, ref_in[0].grad) <= (1e-2 if save_input else 2e-2)
        assert rel(ours_in[3].grad, ref_in[3].grad) <= (1e-2 if save_input else 5e-2)


@pytest.mark.parametrize("save_input", [True, False])
@pytest.mark.parametrize("subln", [True, False])
def test_autocast_runs_the_gemms_in_the_autocast_dtype(subln, save_input, device):
    # fp32 master weights and fp32 activations under bf16 autocast (how HF models train): the output and the backward
    # GEMMs take bf16, as F.linear does under autocast; the gradients keep the parameters' and input's fp32.
    x, w, b, nw = make((3, 37, 48), 24, torch.float32, device, subln=subln)
    dy = torch.randn(3, 37, 24, device=device, dtype=torch.bfloat16)
    outs = []
    for fn in (lambda *t: bk.bitlinear(*t, backend="triton", save_input=save_input),
               lambda *t: ref.bitlinear(*t)):
        xs, ws, bs, nws = clone((x, w, b, nw))
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y = fn(xs, ws, bs, nws)
        y.backward(dy)
        outs.append((y, xs.grad, ws.grad, bs.grad, nws.grad if subln else None))
    (y, *grads), (y_ref, *grads_ref) = outs
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert rel(y, y_ref) <= 1e-2
    for g, g_ref, t in zip(grads, grads_ref, (x, w, b, nw)):
        if g_ref is None:
            continue
        assert g.dtype == t.dtype == torch.float32
        assert rel(g, g_ref) <= (1e-2 if save_input else 2e-2)

"""BitLinear under torch.compile: the custom ops (torch.ops.bitkernels.*) against the eager autograd Function.

On a CPU the ops run their Triton kernels in the interpreter; ``aot_eager`` compiles run the same kernels as eager,
so compiled and eager values must agree exactly. The ``gpu`` test captures the model in CUDA graphs.
"""
import pytest
import torch
import torch.nn as nn

from bitkernels import BitLinear

ops = pytest.importorskip("bitkernels.ops")
from bitkernels.ops import bitlinear_library as library  # noqa: E402
from bitkernels.ops.bitlinear import bitlinear_forward_impl  # noqa: E402  (the module; ops.bitlinear is the function)

# (subln, bias, per_channel, save_input): every option of the eager path, each at least once.
VARIANTS = [(True, True, False, True), (True, False, True, False), (False, True, True, True),
            (False, False, False, True)]
VARIANT_IDS = ["subln-bias", "subln-perchannel-savecodes", "bias-perchannel", "bare"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    # Compiled modules share Module.__call__'s code object: without a reset, earlier tests' entries use up
    # Dynamo's recompile limit (fullgraph=True then fails instead of falling back).
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make_model(variant, dtype, device, k=33, hidden=24, n=17):
    subln, bias, per_channel, save_input = variant
    torch.manual_seed(0)
    model = nn.Sequential(
        BitLinear(k, hidden, bias=bias, subln=subln, per_channel=per_channel, save_input=save_input),
        nn.GELU(),
        BitLinear(hidden, n, bias=not bias, subln=True, per_channel=not per_channel, save_input=save_input),
    ).to(device=device, dtype=dtype)
    with torch.no_grad():  # SubLN weights away from 1, so their gradients and the norm's scaling both matter
        for m in model.modules():
            if isinstance(m, BitLinear) and m.subln is not None:
                m.subln.weight.uniform_(0.5, 1.5)
    return model


def recording_backend(graphs: list):
    """aot_eager that keeps the forward and backward graphs AOTAutograd hands it."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=keep, bw_compiler=keep)


def op_calls(graphs, op) -> int:
    return sum(node.target is op for gm in graphs for node in gm.graph.nodes)


def assert_same(got, expected, what=""):
    """Bit for bit on the CPU (same kernels, same inputs); on a GPU cuBLAS may pick another algorithm for tensors at
    other addresses, so there within float rounding."""
    assert got.dtype == expected.dtype and got.shape == expected.shape, what
    if got.device.type == "cpu":
        assert torch.equal(got, expected), f"{what} differs from eager"
    else:
        torch.testing.assert_close(got, expected, msg=f"{what} differs from eager")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def step(model, x, dy):
    """Output and every gradient (x's, then the parameters') of one forward + backward."""
    x = x.detach().clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    y = model(x)
    y.backward(dy)
    return [y.detach(), x.grad] + [p.grad for p in model.parameters()]


# ---- the ops alone --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_ternarize_absmean(device, per_channel, dtype):
    w = torch.randn(12, 20, device=device, dtype=dtype, requires_grad=True)
    torch.library.opcheck(library.ternarize_absmean, (w, per_channel, 1e-5))


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 3, 20), (0, 20), (20,)], ids=["ragged", "M0", "1d"])
def test_opcheck_bitlinear_forward(device, variant, dtype, shape):
    # Schema, fake shapes/strides, autograd registration and AOT dispatch (dynamic shapes, gradients included).
    subln, bias, per_channel, save_input = variant
    x = torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(12, 20, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(12, device=device, dtype=dtype, requires_grad=True) if bias else None
    nw = (torch.rand(20, device=device, dtype=dtype) + 0.5).requires_grad_() if subln else None
    w_codes, w_scale = library.ternarize_absmean(w.detach(), per_channel, 1e-5)
    torch.library.opcheck(library.bitlinear_forward,
                          (x, w, b, nw, w_codes, w_scale, 1e-6, 1e-5, save_input, dtype))


@pytest.mark.parametrize("saved", ["x", "codes+rstd", "codes"])
@pytest.mark.parametrize("asked", [(True, True, True), (False, True, False), (True, False, False)],
                         ids=["all", "weight", "input"])
def test_opcheck_bitlinear_backward(device, saved, asked):
    m, k, n = 7, 20, 12
    x = torch.randn(m, k, device=device)
    nw = torch.rand(k, device=device) + 0.5 if saved != "codes" else None
    w_codes, w_scale = library.ternarize_absmean(torch.randn(n, k, device=device), False, 1e-5)
    _, codes, a_scale, rstd = bitlinear_forward_impl(x, None, nw, w_codes, w_scale, 1e-6, 1e-5, torch.float32)
    state = {"x": (x, None, None, rstd), "codes+rstd": (None, codes, a_scale, rstd),
             "codes": (None, codes, a_scale, None)}[saved]
    grad_y = torch.randn(m, n, device=device)
    # No requires_grad: the backward op has no autograd of its own (double backward is not supported).
    torch.library.opcheck(library.bitlinear_backward,
                          (grad_y, *state, w_codes, w_scale, nw, 1e-6, 1e-5, torch.float32, torch.float32,
                           torch.float32, *asked))


# ---- whole models under torch.compile -------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_model_equals_eager(device, variant, dtype):
    # fullgraph=True: a graph break anywhere (Python cache, Triton launcher, autograd Function) raises.
    model = make_model(variant, dtype, device)
    graphs = []
    compiled = torch.compile(model, fullgraph=True, backend=recording_backend(graphs))
    for shape in [(5, 33), (2, 7, 33), (3, 4, 33)]:  # ragged; the third runs the dynamic-shape recompile
        x = torch.randn(*shape, device=device, dtype=dtype)
        dy = torch.randn(*shape[:-1], 17, device=device, dtype=dtype)
        expected, got = step(model, x, dy), step(compiled, x, dy)
        for i, (e, g) in enumerate(zip(expected, got)):
            assert_same(g, e, f"{shape}: output/gradient {i}")
    # Each layer went through the custom ops (forward and backward graphs), never the eager Function.
    assert op_calls(graphs, torch.ops.bitkernels.ternarize_absmean.default) >= 2
    assert op_calls(graphs, torch.ops.bitkernels.bitlinear_forward.default) >= 2
    assert op_calls(graphs, torch.ops.bitkernels.bitlinear_backward.default) >= 2


@pytest.mark.parametrize("optimizer", ["adamw_fused", "sgd"])
def test_compiled_codes_follow_every_optimizer_step(device, optimizer):
    # The compiled path keeps no codes between calls: after each step its output must be that of a fresh module
    # holding the new weights. Codes baked into the graph or kept from the first call would give the old output.
    model = make_model(VARIANTS[0], torch.float32, device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    make_opt = {"adamw_fused": lambda p: torch.optim.AdamW(p, lr=0.05, fused=True),
                "sgd": lambda p: torch.optim.SGD(p, lr=0.5)}[optimizer]
    opt = make_opt(model.parameters())
    x = torch.randn(6, 33, device=device)
    previous = None
    for _ in range(3):
        y = compiled(x)
        fresh = make_model(VARIANTS[0], torch.float32, device)
        fresh.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert_same(y.detach(), fresh(x), "output after an optimizer step")
            assert previous is None or not torch.allclose(y, previous)  # the step changed the codes
        previous = y.detach()
        y.square().sum().backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("subln", [True, False])
def test_compiled_follows_autocast(device, subln):
    # fp32 master weights under bf16 autocast: output and backward GEMMs in bf16, gradients in fp32, as eager; the
    # compiled graph guards on the autocast state, so the same model also runs without it.
    model = make_model((subln, True, False, True), torch.float32, device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 5, 33, device=device)
    dy = torch.randn(3, 5, 17, device=device, dtype=torch.bfloat16)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        expected, got = step(model, x, dy), step(compiled, x, dy)
    assert got[0].dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in got[1:])
    for i, (e, g) in enumerate(zip(expected, got)):
        assert_same(g, e, f"output/gradient {i}")
    assert compiled(x).dtype == torch.float32


def test_compiled_frozen_inference(device):
    model = make_model(VARIANTS[1], torch.float32, device)
    for m in model.modules():
        if isinstance(m, BitLinear):
            m.freeze()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 9, 33, device=device)
    assert_same(compiled(x), model(x), "frozen output")


def test_eager_calls_keep_the_autograd_function(device):
    # Outside torch.compile nothing goes through the dispatcher: the custom ops cost more Python per call.
    seen = []
    model = make_model(VARIANTS[0], torch.float32, device)
    y = model(torch.randn(2, 33, device=device, requires_grad=True))
    stack = [y.grad_fn]
    while stack:
        node = stack.pop()
        seen.append(type(node).__name__)
        stack += [f for f, _ in node.next_functions if f is not None]
    assert "BitLinearFunctionBackward" in seen
    assert not any("bitkernels" in name for name in seen)


@pytest.mark.slow
def test_inductor_compiled_model_matches_eager(device):
    # The default backend: ops stay extern calls, GELU and the reshapes become generated code (C++ on a CPU).
    model = make_model(VARIANTS[0], torch.float32, device)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 7, 33, device=device)
    dy = torch.randn(2, 7, 17, device=device)
    for i, (e, g) in enumerate(zip(step(model, x, dy), step(compiled, x, dy))):
        if device.type == "cpu":
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
        else:  # Inductor's GELU may differ from ATen's by an ulp: enough to flip an int8 code now and then
            assert rel(g, e) <= 1e-2, i


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS[:2], ids=VARIANT_IDS[:2])
def test_cudagraph_reduce_overhead_matches_eager(device, variant, monkeypatch):
    # mode="reduce-overhead": cudagraph trees run the graph once eagerly (Triton compiles and autotunes there), then
    # record it, then replay. A host sync or an untuned kernel inside the capture would raise or skip cudagraphs.
    from torch._dynamo.utils import counters

    replays = []
    real_replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda self: replays.append(1) or real_replay(self))
    counters.clear()
    model = make_model(variant, torch.bfloat16, device, k=1024, hidden=3072, n=1024)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    x = torch.randn(4, 512, 1024, device=device, dtype=torch.bfloat16)
    dy = torch.randn(4, 512, 1024, device=device, dtype=torch.bfloat16)
    expected = step(model, x, dy)
    for _ in range(4):  # warm-up, record, replays
        torch.compiler.cudagraph_mark_step_begin()
        got = [t.clone() for t in step(compiled, x, dy)]
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert replays, "the compiled step never replayed a CUDA graph"
    for i, (e, g) in enumerate(zip(expected, got)):
        assert g.dtype == e.dtype and g.shape == e.shape, i
        assert rel(g, e) <= 1e-2, (i, rel(g, e))

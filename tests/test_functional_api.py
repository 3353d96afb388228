"""The checked functional API: backend selection and clear errors on bad input."""
import pytest
import torch

import bitkernels as bk
import bitkernels.reference as ref


def test_backend_switch_runs_both_and_agrees(device):
    x = torch.randn(6, 40, device=device)
    a = bk.quantize_activations_int8(x, backend="triton")
    b = bk.quantize_activations_int8(x, backend="torch")
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


def test_backend_from_environment(monkeypatch, device):
    calls = []
    monkeypatch.setattr(ref, "quantize_activations_int8", lambda x, eps: calls.append("torch") or (x, x))
    monkeypatch.setenv("BITKERNELS_BACKEND", "torch")
    bk.quantize_activations_int8(torch.randn(2, 3, device=device))
    assert calls == ["torch"]
    monkeypatch.setenv("BITKERNELS_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="BITKERNELS_BACKEND"):
        bk.quantize_activations_int8(torch.randn(2, 3, device=device))


def test_triton_backend_refuses_what_it_cannot_run(device):
    with pytest.raises(RuntimeError, match="backend='torch'"):
        bk.quantize_activations_int8(torch.randn(2, 3, dtype=torch.float64, device=device), backend="triton")
    codes, _ = bk.quantize_activations_int8(torch.randn(2, 3, dtype=torch.float64, device=device))  # auto: reference
    assert codes.dtype == torch.int8


@pytest.mark.parametrize("fn", [bk.quantize_activations_int8, bk.fake_quantize_activations, bk.ternarize_absmean,
                                bk.fake_quantize_weight])
def test_integer_input_is_refused(fn, device):
    with pytest.raises(TypeError, match="floating"):
        fn(torch.ones(3, 4, dtype=torch.int8, device=device))


def test_shape_errors_say_what_to_fix(device):
    x = torch.randn(3, 8, device=device)
    with pytest.raises(ValueError, match=r"shape \(8,\)"):
        bk.rmsnorm_quantize_int8(x, torch.ones(7, device=device))
    with pytest.raises(ValueError, match="2-D weight"):
        bk.ternarize_absmean(torch.randn(2, 3, 4, device=device), per_channel=True)
    with pytest.raises(ValueError, match="in_features=5"):
        bk.bitlinear(x, torch.randn(4, 5, device=device))
    with pytest.raises(ValueError, match="bias"):
        bk.bitlinear(x, torch.randn(4, 8, device=device), torch.randn(5, device=device))
    with pytest.raises(ValueError, match="at least 1 dimension"):
        bk.quantize_activations_int8(torch.tensor(1.0, device=device))
    with pytest.raises(TypeError, match="torch.Tensor"):
        bk.quantize_activations_int8([1.0, 2.0])


def test_long_rows(device):
    from bitkernels.ops._common import MAX_ROW
    x = torch.randn(2, MAX_ROW + 3, device=device)
    # The forward quantizers walk long rows in chunks ...
    for u, v in zip(bk.quantize_activations_int8(x, backend="triton"), bk.quantize_activations_int8(x, backend="torch")):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    # ... the RMSNorm backward keeps a row in registers, so training on such rows is refused up front, with advice.
    with pytest.raises(ValueError, match="backend='torch'"):
        bk.rmsnorm_fake_quantize(x, torch.ones(MAX_ROW + 3, device=device), backend="triton")


@pytest.mark.parametrize("subln", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitlinear_triton_matches_reference(subln, dtype, device):
    x = torch.randn(2, 5, 48, device=device, dtype=dtype)
    w = (torch.randn(24, 48, device=device) * 0.05).to(dtype)
    b = torch.randn(24, device=device, dtype=dtype)
    nw = (torch.rand(48, device=device) + 0.5).to(dtype) if subln else None
    outs, grads = [], []
    for backend in ("triton", "torch"):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = bk.bitlinear(xs, ws, b, nw, backend=backend)
        y.float().square().sum().backward()
        outs.append(y.float())
        grads.append((xs.grad.float(), ws.grad.float()))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    scale = outs[1].abs().max().item()
    torch.testing.assert_close(outs[0], outs[1], rtol=tol, atol=tol * scale)
    for g0, g1 in zip(grads[0], grads[1]):
        torch.testing.assert_close(g0, g1, rtol=tol * 4, atol=tol * 4 * g1.abs().max().item())

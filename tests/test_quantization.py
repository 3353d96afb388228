"""Triton quantization kernels against the PyTorch reference (interpreter on CPU, realistic shapes on GPU)."""
import pytest
import torch
import triton

import bitkernels as bk
import bitkernels.reference as ref
from bitkernels import ops
from bitkernels.reference.quantization import ACT_EPS

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ROW_SHAPES = [
    (1,), (5,), (3, 17), (2, 5, 300), (0, 64), (4, 1), (7, 1000), (2, 3, 4, 33),
    pytest.param((8192, 2048), marks=pytest.mark.gpu),
    pytest.param((4093, 9728), marks=pytest.mark.gpu),
    pytest.param((64, 14336), marks=pytest.mark.gpu),
    pytest.param((3, 40000), marks=pytest.mark.gpu),
]
WEIGHT_SHAPES = [
    (1, 1), (3, 17), (64, 48), (5, 4097), (130, 33),
    pytest.param((3072, 1024), marks=pytest.mark.gpu),
    pytest.param((2560, 9728), marks=pytest.mark.gpu),
]


def randn(shape, dtype, device, scale=1.0):
    return (torch.randn(shape, device=device, dtype=torch.float32) * scale).to(dtype)


def assert_ternary_codes(codes, w, scale, per_channel):
    assert codes.dtype == torch.int8 and codes.shape == w.shape
    assert set(codes.unique().tolist()) <= {-1, 0, 1}
    # Exact given the scale: the scale is a float sum whose last bit may differ in order from torch's.
    torch.testing.assert_close(codes, ref.ternarize_with_scale(w, scale), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROW_SHAPES)
def test_quantize_activations_matches_reference_exactly(shape, dtype, device):
    x = randn(shape, dtype, device, scale=3.0)
    codes, scale = ops.quantize_activations_int8(x)
    ref_codes, ref_scale = ref.quantize_activations_int8(x)
    assert codes.dtype == torch.int8 and codes.shape == x.shape and scale.shape == x.shape[:-1]
    assert scale.dtype == torch.float32
    # absmax is order-independent and every step is IEEE-exact: codes and scales equal bit for bit.
    torch.testing.assert_close(codes, ref_codes, rtol=0, atol=0)
    torch.testing.assert_close(scale, ref_scale, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_activations_zero_rows_and_large_magnitudes(dtype, device):
    big = 6e4 if dtype == torch.float16 else 1e30
    x = randn((6, 130), dtype, device)
    x[1] = 0
    x[3] *= big / 8
    x[4, 7] = big
    codes, scale = ops.quantize_activations_int8(x)
    ref_codes, ref_scale = ref.quantize_activations_int8(x)
    assert torch.isfinite(scale).all()
    assert (codes[1] == 0).all() and scale[1].item() == pytest.approx(1e-5 / 127)
    assert codes[4, 7] == 127
    torch.testing.assert_close(codes, ref_codes, rtol=0, atol=0)
    torch.testing.assert_close(scale, ref_scale, rtol=0, atol=0)


def test_rounding_is_half_to_even(device):
    # absmax 127 makes the multiplier exactly 1, so the inputs are the pre-rounding values.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.5, -127.0]], device=device)
    codes, _ = ops.quantize_activations_int8(x)
    assert codes.tolist() == [[127, 0, 2, 2, 0, -2, 4, -127]]
    w = torch.tensor([[0.5, 1.5, -0.5, -1.5]], device=device)  # mean |w| = 1: w/s are exact ties
    codes, scale = ops.ternarize_absmean(w)
    assert scale.item() == 1.0 and codes.tolist() == [[0, 1, 0, -1]]
    assert ref.ternarize_absmean(w)[0].tolist() == [[0, 1, 0, -1]]


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", WEIGHT_SHAPES)
def test_ternarize_absmean_matches_reference(shape, dtype, per_channel, device):
    w = randn(shape, dtype, device, scale=0.02)
    codes, scale = ops.ternarize_absmean(w, per_channel)
    ref_codes, ref_scale = ref.ternarize_absmean(w, per_channel)
    assert scale.shape == ref_scale.shape and scale.dtype == torch.float32
    torch.testing.assert_close(scale, ref_scale, rtol=2e-6, atol=0)
    assert_ternary_codes(codes, w, scale, per_channel)
    # Against the reference's own scale, only weights within rounding of the +-scale/2 threshold may differ.
    ratio = (w.float() * (ref_scale[:, None] if per_channel else ref_scale).reciprocal()).abs()
    differs = codes != ref_codes
    assert ((ratio[differs] - 0.5).abs() < 1e-5).all()


def test_ternarize_large_tensor_uses_many_partials(device):
    w = randn((1100, 4099), torch.float32, device)  # > MAX_PARTIALS blocks: partial sums are grid-strided
    codes, scale = ops.ternarize_absmean(w)
    torch.testing.assert_close(scale, ref.ternarize_absmean(w)[1], rtol=2e-6, atol=0)
    assert_ternary_codes(codes, w, scale, False)


@pytest.mark.parametrize("w_shape", [(130, 97), (300, 97), (7, 3)])
def test_ternarize_programs_taking_several_blocks_give_the_same_codes(w_shape, device, monkeypatch):
    # Large weights take 2 or 4 blocks a codes program (codes_chunks); with its program floor lowered these small ones
    # do too (12610 elements: 2 blocks of 4096 a program; 29100: 4, the last program partly past the end): the same
    # codes and scale as one block a program, in the codes pass and in x's launch.
    import sys

    tern = sys.modules["bitkernels.ops.ternarize"]
    w = randn(w_shape, torch.bfloat16, device, scale=0.02)
    x = randn((5, w_shape[1]), torch.bfloat16, device, scale=2.0)
    nw = randn(w_shape[1:], torch.bfloat16, device) + 1
    one_block = ops.ternarize_absmean(w), ops.ternarize_and_quantize(w, x, nw)
    assert tern.codes_chunks(w.numel(), tern.BLOCK) == 1
    monkeypatch.setattr(tern, "MIN_CODES_PROGRAMS", 1)
    assert tern.codes_chunks(w.numel(), tern.BLOCK) == {130: 2, 300: 4, 7: 1}[w_shape[0]]
    several = ops.ternarize_absmean(w), ops.ternarize_and_quantize(w, x, nw)
    for a, b in zip((*one_block[0], *one_block[1]), (*several[0], *several[1])):
        assert torch.equal(a, b)
    _check_ternarize_and_quantize(w, x, nw)


@pytest.mark.parametrize("per_channel", [False, True])
def test_ternarize_zero_weights_is_defined(per_channel, device):
    w = torch.zeros(8, 20, device=device)
    w[3] = torch.randn(20, device=device) if per_channel else 0
    codes, scale = ops.ternarize_absmean(w, per_channel)
    assert torch.isfinite(scale).all() and (scale >= 1e-5).all()
    assert (codes[0] == 0).all()
    fq = ops.fake_quantize_weight(w, per_channel)
    assert torch.isfinite(fq).all() and (fq[0] == 0).all()


def _separate_quantizations(w, x, nw):
    w_codes, w_scale = ops.ternarize_absmean(w)
    x_codes, x_scale = ops.quantize_activations_int8(x) if nw is None else ops.rmsnorm_quantize_int8(x, nw)
    return w_codes, w_scale, x_codes, x_scale


def _check_ternarize_and_quantize(w, x, nw):
    fused = ops.ternarize_and_quantize(w, x, nw)
    # The same programs as the separate kernels, in one launch: their outputs bit for bit.
    for name, a, b in zip(("weight codes", "weight scale", "x codes", "x scale"), fused,
                          _separate_quantizations(w, x, nw)):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), name
    # And the reference's, within the separate ops' own tolerances (a scale is a sum in another order).
    r_w_codes, r_w_scale, r_x_codes, r_x_scale = ref.ternarize_and_quantize(w, x, nw)
    torch.testing.assert_close(fused[1], r_w_scale, rtol=2e-6, atol=0)
    assert_ternary_codes(fused[0], w, fused[1], False)
    torch.testing.assert_close(fused[3], r_x_scale, rtol=1e-5, atol=0)
    if x.numel():
        assert (fused[2].int() - r_x_codes.int()).abs().max() <= (0 if nw is None else 1)


@pytest.mark.parametrize("subln", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape,w_rows", [
    ((5, 17), 3), ((2, 3, 40), 64), ((0, 16), 200), ((16, 16), 300), ((3, 4097), 5), ((1, 1), 1),
    pytest.param((8192, 2048), 6144, marks=pytest.mark.gpu),
    pytest.param((2048, 9728), 2560, marks=pytest.mark.gpu),
    pytest.param((333, 40000), 7, marks=pytest.mark.gpu),
])
def test_ternarize_and_quantize_equals_the_separate_ops(x_shape, w_rows, dtype, subln, device):
    # Shapes: ragged; zero rows of x (the launch codes the weight alone); 16-column rows, whose 1-warp tiling gives
    # 1024-element weight blocks, several of them; more weight blocks than partial sums of |w|.
    x = randn(x_shape, dtype, device, scale=3.0)
    w = randn((w_rows, x_shape[-1]), dtype, device, scale=0.02)
    nw = randn(x_shape[-1:], dtype, device) + 1 if subln else None
    _check_ternarize_and_quantize(w, x, nw)


def test_ternarize_and_quantize_strided_inputs(device):
    x = randn((5, 80), torch.float16, device, scale=2.0)[:, ::2]  # rows with a stride: copied to unit stride
    w = randn((30, 80), torch.float32, device, scale=0.02)[:, ::2]  # not contiguous: the kernels index it flat
    _check_ternarize_and_quantize(w, x, randn((40,), torch.float16, device) + 1)


@pytest.mark.parametrize("subln", [True, False])
def test_ternarize_and_quantize_long_rows_and_strided_inputs(subln, device, long_rows):
    # Rows past SINGLE_PASS_MAX take the separate ops (ternarize_and_quantize's docstring): same results.
    x = randn((6, 100), torch.bfloat16, device, scale=2.0)
    x[:, -1] = 40.0  # the absmax in the last columns: the tail tile (or the last chunk) decides the scale
    w = randn((70, 200), torch.float32, device, scale=0.02)[:, ::2]  # not contiguous
    nw = randn((100,), torch.bfloat16, device) + 1 if subln else None
    _check_ternarize_and_quantize(w, x, nw)


@pytest.mark.gpu
@pytest.mark.parametrize("k", [1024, 2048, 9728])  # 9728: long rows, the separate ops
def test_ternarize_and_quantize_same_weight_scale_as_ternarize_over_many_weights(k, device):
    # A float sum of the partial sums follows each launch's layout: added that way, 8-11 weights in 24 got a scale an
    # ulp away from ternarize's own in x's launch (H200, K=1024). The interpreter has no layouts: GPU only.
    x = torch.randn(64, k, device=device, dtype=torch.bfloat16)
    for seed in range(24):
        torch.manual_seed(seed)
        w = torch.randn(3 * k, k, device=device, dtype=torch.bfloat16) * k ** -0.5
        fused = ops.ternarize_and_quantize(w, x, torch.ones(k, device=device, dtype=torch.bfloat16))
        alone = ops.ternarize_absmean(w)
        assert torch.equal(fused[1], alone[1]) and torch.equal(fused[0], alone[0]), seed


def test_ternarize_and_quantize_refuses_mismatched_shapes(device):
    with pytest.raises(ValueError, match="in_features"):
        ops.ternarize_and_quantize(torch.randn(4, 8, device=device), torch.randn(3, 9, device=device))


def test_ternarize_and_quantize_zero_weight_is_defined(device):
    w = torch.zeros(4, 32, device=device)
    w_codes, w_scale, _, _ = ops.ternarize_and_quantize(w, torch.randn(3, 32, device=device))
    assert (w_codes == 0).all() and w_scale.item() == pytest.approx(1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROW_SHAPES)
def test_rmsnorm_quantize_matches_reference(shape, dtype, device):
    x = randn(shape, dtype, device, scale=2.0)
    w = randn(shape[-1:], dtype, device) + 1
    codes, scale = ops.rmsnorm_quantize_int8(x, w)
    ref_codes, ref_scale = ref.rmsnorm_quantize_int8(x, w)
    assert codes.shape == x.shape and scale.shape == x.shape[:-1]
    torch.testing.assert_close(scale, ref_scale, rtol=1e-5, atol=0)
    # 1/rms is a sum in another order: a value sitting on a rounding tie may land one code away, nothing more.
    diff = (codes.int() - ref_codes.int()).abs()
    assert diff.max().item() <= 1 if diff.numel() else True
    assert diff.float().mean().item() < 1e-3 if diff.numel() else True


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 8), (3, 17), (2, 5, 300), (0, 16), (7, 1000),
                                   pytest.param((4096, 2048), marks=pytest.mark.gpu),
                                   pytest.param((1024, 9728), marks=pytest.mark.gpu)])
def test_rmsnorm_fake_quantize_forward_and_gradients(shape, dtype, device):
    x = randn(shape, dtype, device, scale=2.0)
    w = randn(shape[-1:], dtype, device) * 0.1 + 1
    dy = randn(shape, dtype, device)
    xk, wk = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = ops.rmsnorm_fake_quantize(xk, wk)
    y.backward(dy)
    # Reference gradients in float64: the quantizer is straight-through, so these are RMSNorm's.
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    ref.rmsnorm(xr, wr).backward(dy.double())
    assert y.dtype == dtype and y.shape == x.shape
    codes, scale = ref.rmsnorm_quantize_int8(x, w)
    y_ref = (codes.float() * scale.unsqueeze(-1)).to(dtype)
    # One code of difference at most (see the codes test), plus the rounding of both values to ``dtype``.
    step = scale.unsqueeze(-1).expand_as(y).float()
    slack = 2 * torch.finfo(dtype).eps * y_ref.float().abs()
    assert ((y.float() - y_ref.float()).abs() <= step * 1.001 + slack + 1e-6).all()
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(xk.grad.double(), xr.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(wk.grad.double(), wr.grad, rtol=tol, atol=tol * max(1, shape[0] if len(shape) > 1 else 1) ** 0.5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fake_quantizers_are_straight_through(dtype, device):
    x = randn((4, 33), dtype, device).requires_grad_()
    w = randn((9, 33), dtype, device).requires_grad_()
    g = randn((4, 33), dtype, device)
    ya = ops.fake_quantize_activations(x)
    codes, scale = ref.quantize_activations_int8(x)
    torch.testing.assert_close(ya, (codes.float() * scale[:, None]).to(dtype), rtol=0, atol=0)
    ya.backward(g)
    torch.testing.assert_close(x.grad, g, rtol=0, atol=0)
    yw = ops.fake_quantize_weight(w)
    wcodes, wscale = ops.ternarize_absmean(w)
    torch.testing.assert_close(yw, (wcodes.float() * wscale).to(dtype), rtol=0, atol=0)
    gw = randn((9, 33), dtype, device)
    yw.backward(gw)
    torch.testing.assert_close(w.grad, gw, rtol=0, atol=0)


def test_non_contiguous_inputs_are_handled(device):
    x = randn((40, 24), torch.float32, device).t()  # [24, 40] with a non-unit column stride
    codes, scale = ops.quantize_activations_int8(x)
    ref_codes, ref_scale = ref.quantize_activations_int8(x.contiguous())
    torch.testing.assert_close(codes, ref_codes, rtol=0, atol=0)
    w = randn((40, 24), torch.float32, device).t()
    codes, scale = ops.ternarize_absmean(w, per_channel=True)
    torch.testing.assert_close(scale, ref.ternarize_absmean(w.contiguous(), True)[1], rtol=2e-6, atol=0)
    sliced = randn((6, 64), torch.float32, device)[:, ::2]
    torch.testing.assert_close(ops.quantize_activations_int8(sliced)[0],
                               ref.quantize_activations_int8(sliced)[0], rtol=0, atol=0)


@pytest.fixture(params=["chunks", "head_and_tail"])
def long_rows(request, monkeypatch):
    """Force the long-row paths of the forward quantizers at small shapes: rows walked in column chunks (two or
    three passes), and rows held as a SINGLE_PASS_MAX-wide head tile plus a tail tile."""
    from bitkernels.ops import _common

    monkeypatch.setattr(_common, "SINGLE_PASS_MAX", 16)
    monkeypatch.setattr(_common, "CHUNK", 16)
    monkeypatch.setattr(_common, "SPLIT_ROW_MAX", 0 if request.param == "chunks" else 16 + 128)
    _common.row_tiling.cache_clear()  # cached per row length under the real limits; again after, under these
    yield request.param
    _common.row_tiling.cache_clear()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 33), (5, 100), (1, 17), (0, 40), (4, 144)])
def test_long_row_paths_match_reference(shape, dtype, device, long_rows):
    from bitkernels.ops._common import row_tiling

    tiling = row_tiling(shape[-1])
    assert tiling.block_n == 16 and tiling.chunked == (long_rows == "chunks")
    assert tiling.tail == (0 if long_rows == "chunks" else triton.next_power_of_2(shape[-1] - 16))
    x = randn(shape, dtype, device, scale=2.0)
    if x.numel():  # the absmax in the last columns: the tail tile (or the last chunk) decides the scale
        x[:, -1] = 40.0
    codes, scale = ops.quantize_activations_int8(x)
    ref_codes, ref_scale = ref.quantize_activations_int8(x)
    torch.testing.assert_close(codes, ref_codes, rtol=0, atol=0)
    torch.testing.assert_close(scale, ref_scale, rtol=0, atol=0)
    w = randn(shape[-1:], dtype, device) + 1
    codes, scale = ops.rmsnorm_quantize_int8(x, w)
    ref_codes, ref_scale = ref.rmsnorm_quantize_int8(x, w)
    torch.testing.assert_close(scale, ref_scale, rtol=1e-5, atol=0)
    if codes.numel():
        assert (codes.int() - ref_codes.int()).abs().max() <= 1
    y = ops.rmsnorm_fake_quantize(x, w)
    torch.testing.assert_close(y, (codes.float() * scale.unsqueeze(-1)).to(dtype), rtol=0, atol=0)


@pytest.fixture(params=["whole_rows", "row_dot_then_tiles"])
def rmsnorm_backward_path(request, monkeypatch):
    """Both RMSNorm backward paths at small shapes: rows in registers, and the long-row pair (per-row dot, then
    column tiles), forced with small blocks so rows span several chunks and tiles."""
    from bitkernels.ops import rmsnorm_quant

    if request.param == "row_dot_then_tiles":
        monkeypatch.setattr(rmsnorm_quant, "WHOLE_ROW_MAX", 8)
        monkeypatch.setattr(rmsnorm_quant, "DOT_BLOCK", 64)
        monkeypatch.setattr(rmsnorm_quant, "TILE_M", 4)
        monkeypatch.setattr(rmsnorm_quant, "TILE_N", 32)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 100), (64, 32), (150, 70),
                                   pytest.param((528, 2048), marks=pytest.mark.gpu)])
def test_rmsnorm_dw_partials_sum(shape, dtype, device):
    """The RMSNorm backward's final column sum of per-program dw rows: partial counts past one block (150 >
    SUM_BLOCK_P = 128), ragged columns, rounded once to the norm weight's dtype."""
    from bitkernels.ops.rmsnorm_quant import _sum_dw_partials

    partial = randn(shape, torch.float32, device)
    dw = _sum_dw_partials(partial, dtype)
    assert dw.dtype == dtype and dw.shape == shape[-1:]
    # fp32 summation in another order than fp64's, then one rounding: within a unit of the output dtype.
    rtol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(dw.double(), partial.double().sum(0).to(dtype).double(), rtol=rtol, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 17), (37, 300), (0, 64), (1, 1000), (9, 2048), (5, 2600),
                                   pytest.param((8192, 2560), marks=pytest.mark.gpu),
                                   pytest.param((2048, 9728), marks=pytest.mark.gpu)])
def test_rmsnorm_backward_and_dequantize(shape, dtype, device, rmsnorm_backward_path):
    if device.type == "cpu" and rmsnorm_backward_path == "row_dot_then_tiles" and shape[-1] in (2048, 2600):
        pytest.skip("these widths check whole_row_bwd_block's tilings; the forced small-block path is slow here")
    eps, act_eps = 1e-6, ACT_EPS
    x = randn(shape, dtype, device, scale=2.0)
    w = randn(shape[-1:], dtype, device) * 0.1 + 1
    w[1] = 0  # a zero norm weight: no gradient through that column from the codes
    dy = randn(shape, dtype, device)
    codes, scale, rstd = ops.rmsnorm_quantize_int8_forward(x, w, eps, act_eps)
    # What the forward's GEMM consumed: these codes times their scale, rounded once to dtype. (Not a second forward
    # pass: on a GPU its row sums may reduce in another order and move 1/rms, hence codes, by an ulp.)
    forward_deq = (codes.float() * scale.unsqueeze(-1)).to(dtype)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    dw_atol = tol * max(1, shape[0]) ** 0.5

    # From x and the forward's 1/rms: the forward's codes rebuilt bit for bit; dx, dw are RMSNorm's (float64 autograd).
    dx, dw, xq = ops.rmsnorm_backward_and_dequantize(dy, x, w, rstd, act_eps, dtype)
    torch.testing.assert_close(xq, forward_deq, rtol=0, atol=0)
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    ref.rmsnorm(xr, wr, eps).backward(dy.double())
    assert dx.dtype == dtype and dw.dtype == dtype
    torch.testing.assert_close(dx.double(), xr.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(dw.double(), wr.grad, rtol=tol, atol=dw_atol)
    dx2, dw2 = ops.rmsnorm_backward(dy, x, w, rstd)  # the same pass without the dequantized output
    torch.testing.assert_close(dx2, dx, rtol=0, atol=0)
    torch.testing.assert_close(dw2, dw, rtol=0, atol=0)
    # dx over dy, and only each row's absmax: the same dx and dw; the codes rebuilt a ragged column block at a
    # time are the forward's, bit for bit.
    dy_copy = dy.clone()
    dx3, dw3, absmax = ops.rmsnorm_backward_and_absmax(dy_copy, x, w, rstd, act_eps, overwrite_dy=True)
    assert dx3.data_ptr() == dy_copy.data_ptr()
    torch.testing.assert_close(dx3, dx, rtol=0, atol=0)
    torch.testing.assert_close(dw3, dw, rtol=0, atol=0)
    torch.testing.assert_close(absmax * (1.0 / 127.0), scale, rtol=0, atol=0)
    n, block = shape[-1], shape[-1] // 3 + 1
    blocks = [ops.rmsnorm_dequantize_columns(x, w, rstd, absmax, i, min(i + block, n), dtype)
              for i in range(0, n, block)]
    torch.testing.assert_close(torch.cat(blocks, 1) if blocks else forward_deq, forward_deq, rtol=0, atol=0)

    # From the int8 codes: x_hat = codes * scale / w (the quantized value), in float64 for the expected gradients.
    dx, dw, xq = ops.rmsnorm_backward_and_dequantize(dy, codes, w, rstd, act_eps, dtype, scale, dtype)
    torch.testing.assert_close(xq, forward_deq, rtol=0, atol=0)
    wd, r = w.double(), rstd.double().unsqueeze(-1)
    x_hat = torch.where(wd != 0, codes.double() * scale.double().unsqueeze(-1) / torch.where(wd != 0, wd, 1), 0)
    g = dy.double() * wd
    dx_ref = r * (g - x_hat * (g * x_hat).mean(-1, keepdim=True))
    torch.testing.assert_close(dx.double(), dx_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(dw.double(), (dy.double() * x_hat).sum(0), rtol=tol, atol=dw_atol)

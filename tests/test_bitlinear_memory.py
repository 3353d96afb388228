"""The BitLinear backward's temporaries: x's dequantized codes made a block of columns at a time for the weight
gradient, and dx written over grad_h. Same gradients as one GEMM over all of them, and a peak below the old
backward's (which held grad_h, dx and every dequantized code at once), counted by a storage tracker on any device."""
import gc
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from bitkernels import ops
from bitkernels.ops import bitlinear_impl
from bitkernels.ops._common import device_info

M, K, N = 256, 600, 40  # x's M x K dominates W's N x K and one block, as at real token counts
BLOCK = 128  # columns a block in these tests: 600 = 4 whole blocks and a ragged one


aten = torch.ops.aten
# Views, copies and the interpreter's own storage rewiring (set_ onto a launch argument's storage): they make no
# storage, and collecting before each of them (the interpreter runs a few per argument of every launch) is slow.
_NO_ALLOCATION = {aten.set_, aten.copy_, aten.new_empty, aten.slice, aten.t, aten.detach, aten.view, aten.as_strided,
                  aten.alias, aten.select, aten.unsqueeze, aten.reshape, aten._unsafe_view}


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages that ops create under this mode and that are still alive, and their peak. Views
    and ``out=`` results (an input's storage) are not new. Each op first collects cyclic garbage: Triton's
    interpreter leaves a launch's arguments in a reference cycle, which a GPU launch does not."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._alive = set()

    def _freed(self, key, nbytes):
        self.live -= nbytes
        self._alive.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in _NO_ALLOCATION:
            return func(*args, **(kwargs or {}))
        gc.collect()
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and key not in self._alive and key not in inputs:
                    self._alive.add(key)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._freed, key, nbytes)
        return out


@pytest.fixture
def blocks_of_128(monkeypatch):
    """A block budget that makes 128-column blocks of bf16 codes at this file's M."""
    monkeypatch.setattr(bitlinear_impl, "GRAD_WEIGHT_BLOCK_BYTES", M * BLOCK * 2)


def _inputs(dtype, device, subln):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g).to(device, dtype)
    w = (torch.randn(N, K, generator=g) * K ** -0.5).to(device, dtype)
    nw = (torch.rand(K, generator=g) + 0.5).to(device, dtype) if subln else None
    dy = torch.randn(M, N, generator=g).to(device, dtype)
    return x, w, nw, dy


def _grads(x, w, nw, dy, save_input):
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    nws = None if nw is None else nw.clone().requires_grad_()
    ops.bitlinear(xs, ws, None, nws, save_input=save_input).backward(dy)
    return xs.grad, ws.grad, None if nws is None else nws.grad


def test_block_columns():
    assert bitlinear_impl.grad_weight_block_columns(8192, 1024, torch.bfloat16) == 1024  # 16 MiB: one block
    assert bitlinear_impl.grad_weight_block_columns(8192, 9728, torch.bfloat16) == 1024
    assert bitlinear_impl.grad_weight_block_columns(8192, 9728, torch.float32) == 512
    assert bitlinear_impl.grad_weight_block_columns(1 << 20, 9728, torch.bfloat16) == 128  # never under 128
    assert bitlinear_impl.grad_weight_block_columns(0, 64, torch.bfloat16) == 64


def test_block_bounds():
    full = bitlinear_impl.grad_weight_block_bounds(9728, 1024)
    assert [j - i for i, j in full] == [1024] * 9 + [512]
    equal = bitlinear_impl.grad_weight_block_bounds(9728, 1024, equal=True)
    assert [j - i for i, j in equal] == [1024] * 6 + [896] * 4  # as many blocks, none narrower than 896
    ragged = bitlinear_impl.grad_weight_block_bounds(600, 256, equal=True)
    assert ragged == [(0, 256), (256, 512), (512, 600)]
    assert bitlinear_impl.grad_weight_block_bounds(200, 64, equal=True) == [(0, 64), (64, 128), (128, 192), (192, 200)]
    for k, block in [(600, 128), (9728, 1024), (1000, 384), (6144, 1024), (130, 128), (64, 64), (200, 64)]:
        for bounds in (bitlinear_impl.grad_weight_block_bounds(k, block, e) for e in (False, True)):
            assert bounds[0][0] == 0 and bounds[-1][1] == k
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous, no column twice
            assert all(0 < j - i <= block for i, j in bounds)
        assert len(bitlinear_impl.grad_weight_block_bounds(k, block, True)) == -(-k // block)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("subln,save_input", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("block,equal", [(BLOCK, False), (512, True)])  # 600 = 512 + 88, or 384 + 216
def test_blocked_weight_gradient_equals_one_gemm(device, dtype, subln, save_input, block, equal, monkeypatch):
    x, w, nw, dy = _inputs(dtype, device, subln)
    whole = _grads(x, w, nw, dy, save_input)
    monkeypatch.setattr(bitlinear_impl, "GRAD_WEIGHT_EQUAL_BLOCKS", equal)
    monkeypatch.setattr(bitlinear_impl, "GRAD_WEIGHT_BLOCK_BYTES", M * block * dtype.itemsize)
    assert bitlinear_impl.grad_weight_block_columns(M, K, dtype) == block
    if equal:
        assert bitlinear_impl.grad_weight_block_bounds(K, block, True) == [(0, 384), (384, 600)]
    blocked = _grads(x, w, nw, dy, save_input)
    for name, a, b in zip(("x", "weight", "norm_weight"), blocked, whole):
        if b is not None:
            # dx and dw come from the same kernels either way; grad_W's columns are the same dots over M, in GEMMs of
            # another width (a BLAS may block the reduction differently: an ulp of the accumulation at most).
            tol = 0 if name != "weight" else (1e-6 if dtype == torch.float32 else 1e-2)
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item(), msg=name)


def test_blocked_weight_gradient_in_fp32_master_weights_under_autocast(device, blocks_of_128):
    # grad_W in the weight's fp32 from bf16 GEMMs: the blocks are copied in, not written by the GEMM (dtypes differ).
    x, w, nw, dy = _inputs(torch.float32, device, True)
    ws = w.clone().requires_grad_()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = ops.bitlinear(x, ws, None, nw)
    y.backward(dy.bfloat16())
    assert ws.grad.dtype == torch.float32
    g = dy.bfloat16()
    x_deq = ops.rmsnorm_fake_quantize(x, nw).bfloat16()
    torch.testing.assert_close(ws.grad, torch.mm(g.t(), x_deq).float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("subln,save_input", [(True, True), (True, False), (False, True)])
def test_backward_peak_is_its_outputs_and_one_block(device, subln, save_input, blocks_of_128):
    """The peak of what the backward allocates is its outputs (grad_x, grad_W, grad of the norm weight) plus
    its largest temporary: the dequantized weight for grad_h's GEMM, or one block of dequantized codes. The old
    backward also held grad_h beside dx and all M x K dequantized codes: two more M x K buffers."""
    dtype = torch.bfloat16
    x, w, nw, dy = _inputs(dtype, device, subln)
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    nws = None if nw is None else nw.clone().requires_grad_()
    y = ops.bitlinear(xs, ws, None, nws, save_input=save_input)
    gc.collect()  # the forward's interpreter garbage (see LiveBytes)
    tracker = LiveBytes()  # counts what the backward allocates, no more
    with tracker:
        y.backward(dy)
    peak = tracker.peak
    elt = 2
    outputs = (M * K + N * K + (K if subln else 0)) * elt
    largest_temporary = max(N * K, M * BLOCK) * elt
    # the norm backward's fp32 dw rows (at most 4 programs an SM, and one) and per-row scalars
    small = (4 * device_info(device).sm_count + 1) * K * 4 + 16 * M
    assert peak <= outputs + largest_temporary + small, (peak, outputs, largest_temporary, small)
    # the old backward kept grad_h beside dx (SubLN) and all the dequantized codes: M x K more at least
    assert peak < outputs + M * K * elt


def test_bad_overwrite_and_column_range_raise(device):
    x = torch.randn(4, 32, device=device)
    w = torch.rand(32, device=device) + 0.5
    _, _, rstd = ops.rmsnorm_quantize_int8_forward(x, w, 1e-6, 1e-5)
    with pytest.raises(ValueError, match="overwrite_dy needs dy of dx's dtype"):
        ops.rmsnorm_backward(torch.randn(4, 32, device=device, dtype=torch.bfloat16), x, w, rstd, overwrite_dy=True)
    absmax = ops.rmsnorm_backward_and_absmax(torch.randn_like(x), x, w, rstd, 1e-5)[2]
    with pytest.raises(ValueError, match=r"columns \[8, 40\) are not within the 32 columns"):
        ops.rmsnorm_dequantize_columns(x, w, rstd, absmax, 8, 40, torch.float32)

"""``_launch.launch``: its cache key separates whatever Triton specializes on; on a GPU, direct launches of the cached
compiled kernels give the same results as Triton's own launch path."""
import pytest
import torch
import triton.language as tl
from triton.runtime.jit import JITFunction

import bitkernels.reference as ref
from bitkernels.ops import _launch


def _signature(x_ptr, n, eps, BLOCK: tl.constexpr, FLAG: tl.constexpr = False):
    pass


def test_specialization_key_separates_what_triton_specializes_on():
    spec = _launch._specialization
    buf = torch.zeros(64, dtype=torch.bfloat16)
    assert spec(buf) != spec(buf[1:])  # a pointer's 16-byte alignment
    assert spec(buf[8:]) == spec(buf)  # 16 bytes further on: the same class
    assert spec(buf) != spec(buf.view(torch.float16))  # the dtype
    assert len({spec(1), spec(16), spec(17), spec(2**31), spec(2**63)}) == 5  # ==1, %16, int32 / int64 / uint64
    assert spec(True) != spec(1) and spec(0.5) == spec(3.0) and spec(None) is None
    with pytest.raises(_launch._NotCacheable):
        spec(object())


def test_constexpr_tail_needs_runtime_args_positional_and_constexprs_by_keyword():
    kernel = JITFunction(_signature)
    assert _launch._constexpr_tail(kernel, 3, dict(BLOCK=4, FLAG=True, num_warps=4)) == (4, True)
    assert _launch._constexpr_tail(kernel, 2, dict(eps=1.0, BLOCK=4, FLAG=True)) is None  # runtime arg by keyword
    assert _launch._constexpr_tail(kernel, 3, dict(BLOCK=4)) is None  # a constexpr left to its default
    assert _launch._constexpr_tail(kernel, 4, dict(FLAG=True)) is None  # a constexpr passed positionally


@pytest.mark.gpu
def test_direct_launches_give_tritons_results(monkeypatch):
    from bitkernels import ops

    hits = []

    class CountingCache(dict):
        def get(self, key, default=None):
            value = super().get(key, default)
            hits.append(value is not None)
            return value

    monkeypatch.setattr(_launch, "_compiled", CountingCache())
    m, k = 4097, 96
    buf = torch.randn(m * k + 8, device="cuda", dtype=torch.bfloat16)
    # aligned, misaligned by one element (another specialization: must not reuse the aligned kernel), then both again
    for offset in (0, 1, 0, 1, 8):
        x = buf[offset:offset + m * k].view(m, k)
        codes, scale = ops.quantize_activations_int8(x)
        ref_codes, ref_scale = ref.quantize_activations_int8(x)
        assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale), offset
    assert hits == [False, False, True, True, True]

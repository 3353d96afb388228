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
    assert spec(-32) == spec(32) != spec(-31) == spec(31)  # divisibility of negative values too
    assert spec(2**31 - 16) != spec(2**31) and spec(-2**31) != spec(-2**31 - 16)  # the int32 range, both ends
    assert spec(0.5) == spec(3.0)
    assert len({spec(True), spec(1), spec(0.5), spec(None), spec(buf)}) == 5  # bool, int, float, None, tensor
    with pytest.raises(_launch._NotCacheable):
        spec(object())


def test_cache_key_is_a_superset_of_tritons_specialization():
    """Two launches share a cache entry only where Triton would launch the same compiled kernel: integers by value
    (finer than Triton's classes), tensors by dtype and 16-byte alignment (not address), other arguments by class,
    keywords by value."""
    def key(*args, **kwargs):
        return _launch._cache_key(_signature, 0, args, kwargs)

    buf = torch.zeros(64, dtype=torch.bfloat16)
    assert key(buf, 7, 0.5, BLOCK=4) == key(buf[8:], 7, 2.0, BLOCK=4)  # another aligned address, another float
    assert key(buf, 7, 0.5, BLOCK=4) != key(buf[1:], 7, 0.5, BLOCK=4)  # misaligned pointer
    assert key(buf, 7, 0.5, BLOCK=4) != key(buf.view(torch.float16), 7, 0.5, BLOCK=4)  # dtype
    assert key(buf, 7, 0.5, BLOCK=4) != key(buf, 8, 0.5, BLOCK=4)  # integers by value
    assert key(buf, 7, 0.5, BLOCK=4) != key(buf, 7, 0.5, BLOCK=8)  # constexprs by value
    assert key(buf, 1, 0.5, BLOCK=4) != key(buf, True, 0.5, BLOCK=4)  # a bool is not the integer 1 (1 == True)
    assert key(buf, 7, 0.5, BLOCK=4) != key(buf, 7, None, BLOCK=4)  # float vs None
    param = torch.nn.Parameter(buf.clone())  # a tensor subclass: the same (dtype, alignment) part
    assert key(param, 7, 0.5, BLOCK=4) == key(buf, 7, 0.5, BLOCK=4)
    with pytest.raises(_launch._NotCacheable):
        key(object(), 7, 0.5, BLOCK=4)


def test_cache_starts_over_past_its_bound(monkeypatch):
    """One entry per distinct integer value (a new batch size) must not grow the cache without bound."""
    class FakeCompiled:
        pass

    kernel = JITFunction(_signature)
    monkeypatch.setattr(_launch, "ENABLED", True)
    monkeypatch.setattr(_launch, "CompiledKernel", FakeCompiled)
    monkeypatch.setattr(_launch, "_hooks_idle", lambda: True)
    monkeypatch.setattr(_launch, "current_cuda_device", lambda: 0)
    monkeypatch.setattr(_launch, "_compiled", {})
    monkeypatch.setattr(_launch, "MAX_ENTRIES", 4)
    monkeypatch.setattr(JITFunction, "__getitem__", lambda self, grid: lambda *args, **kwargs: FakeCompiled())
    buf = torch.zeros(8)
    for n in range(10):  # each a cache miss (Triton's path), then kept
        _launch.launch(kernel, (1,), buf, n, 0.5, BLOCK=4, FLAG=False)
        assert 1 <= len(_launch._compiled) <= 4
    assert len(_launch._compiled) == 2  # cleared at the 5th and 9th values, then the 9th and 10th kept


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


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_direct_launches_of_the_tma_gemm(monkeypatch, out_dtype):
    """The TMA GEMM (device-side descriptors in launch scratch memory) takes the direct path too: after the autotuned
    first call and Triton's first launch of the tuned config, later calls hit the cache and give the pointer kernel's
    bits."""
    from bitkernels import ops
    from bitkernels.ops.int8_matmul import _int8_matmul_tma_kernel

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm_90+")
    hits = []

    class CountingCache(dict):  # counts the TMA kernel's lookups only (the pointer kernel checks the results)
        def get(self, key, default=None):
            value = super().get(key, default)
            if key[0] == id(_int8_matmul_tma_kernel.fn):
                hits.append(value is not None)
            return value

    monkeypatch.setattr(_launch, "_compiled", CountingCache())
    m, n, k = 300, 200, 192
    for seed in range(4):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        a = torch.randint(-128, 128, (m, k), device="cuda", dtype=torch.int8, generator=gen)
        b = torch.randint(-1, 2, (n, k), device="cuda", dtype=torch.int8, generator=gen)
        sa = torch.rand(m, device="cuda", generator=gen) + 0.01
        sb = torch.rand((), device="cuda", generator=gen) + 0.01
        out = ops.int8_matmul(a, b, sa, sb, out_dtype=out_dtype, tma=True)
        assert torch.equal(out, ops.int8_matmul(a, b, sa, sb, out_dtype=out_dtype, tma=False))  # shared epilogue
        exact = (a.double() @ b.double().t()) * sa.double()[:, None] * sb.double()
        assert ((out.double() - exact).norm() / exact.norm()).item() < 8e-3
    assert len(hits) >= 3 and not hits[0] and all(hits[1:]), hits

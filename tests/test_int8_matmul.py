"""int8 x int8 -> int32 GEMM with scale/bias epilogue, the dequantization and the backward GEMMs, vs float64."""
import pytest
import torch

from bitkernels import reference as ref

ops = pytest.importorskip("bitkernels.ops")

TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def codes(*shape, lo=-128, hi=127, device="cpu"):
    return torch.randint(lo, hi + 1, shape, dtype=torch.int8, device=device)


@pytest.mark.parametrize("m,n,k", [(1, 5, 7), (3, 17, 33), (37, 29, 70), (16, 16, 32)])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int8_matmul_matches_fp64(device, m, n, k, per_channel, dtype):
    a, b = codes(m, k, device=device), codes(n, k, lo=-1, hi=1, device=device)
    sa = torch.rand(m, device=device) + 0.01
    sb = torch.rand(n if per_channel else (), device=device) + 0.01
    bias = torch.randn(n, device=device, dtype=dtype)
    out = torch.full((m, n), float("nan"), device=device, dtype=dtype)
    out = ops.int8_matmul(a, b, sa, sb, bias, out_dtype=dtype)
    exact = (a.double() @ b.double().t()) * sa.double()[:, None] * (sb.double() if per_channel else sb.double()) \
        + bias.double()
    assert out.dtype == dtype and out.shape == (m, n)
    assert torch.isfinite(out).all()
    assert rel(out, exact) <= TOL[dtype]
    torch.testing.assert_close(out, ref.int8_matmul(a, b, sa, sb, bias, dtype), rtol=TOL[dtype], atol=1e-5)


def _tma_runs_here(device) -> bool:
    return device.type == "cpu" or torch.cuda.get_device_capability(device)[0] >= 9


@pytest.mark.parametrize("m,n,k", [(1, 5, 16), (37, 29, 96), (70, 40, 160)])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_int8_matmul_tma_kernel_equals_pointer_kernel(device, m, n, k, per_channel, dtype):
    # The TMA kernel (zero-filled tiles past M, N, K; persistent programs walking several tiles on the CPU's 2
    # "SMs") and the pointer kernel share the epilogue: bit-identical outputs, both within TOL of fp64.
    if not _tma_runs_here(device):
        pytest.skip("TMA needs sm_90+")
    a, b = codes(m, k, device=device), codes(n, k, lo=-1, hi=1, device=device)
    sa = torch.rand(m, device=device) + 0.01
    sb = torch.rand(n if per_channel else (), device=device) + 0.01
    bias = torch.randn(n, device=device, dtype=dtype)
    tma = ops.int8_matmul(a, b, sa, sb, bias, out_dtype=dtype, tma=True)
    pointer = ops.int8_matmul(a, b, sa, sb, bias, out_dtype=dtype, tma=False)
    exact = (a.double() @ b.double().t()) * sa.double()[:, None] * sb.double() + bias.double()
    assert torch.equal(tma, pointer)
    assert rel(tma, exact) <= TOL[dtype]
    # a second call of the same key launches the tuned config directly (no autotuner): the same result
    assert torch.equal(ops.int8_matmul(a, b, sa, sb, bias, out_dtype=dtype, tma=True), tma)
    assert torch.equal(ops.int8_matmul(a, b, sa, sb, bias, out_dtype=dtype, tma=False), pointer)


def test_int8_matmul_tma_takes_16_bit_outputs_only(device):
    from bitkernels.ops.int8_matmul import tma_output_ok

    assert tma_output_ok(torch.bfloat16) and tma_output_ok(torch.float16) and not tma_output_ok(torch.float32)
    a, b = codes(4, 32, device=device), codes(3, 32, lo=-1, hi=1, device=device)
    with pytest.raises(ValueError, match="16-bit out_dtype"):
        ops.int8_matmul(a, b, torch.ones(4, device=device), torch.ones((), device=device), out_dtype=torch.float32,
                        tma=True)


@pytest.mark.gpu
def test_int8_matmul_float32_output_at_a_tma_sized_gemm():
    # The automatic choice must not hand a float32 output to the TMA kernel (its configs do not fit in shared memory).
    m, n, k = 8192, 2048, 2048
    a, b = codes(m, k, device="cuda"), codes(n, k, lo=-1, hi=1, device="cuda")
    sa, sb = torch.rand(m, device="cuda") + 0.01, torch.rand((), device="cuda") + 0.01
    out = ops.int8_matmul(a, b, sa, sb, out_dtype=torch.float32)
    exact = (a.double() @ b.double().t()) * sa.double()[:, None] * sb.double()
    assert rel(out, exact) <= TOL[torch.float32]


def _tma_operands(m, n, k, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    a = torch.randint(-128, 128, (m, k), device="cuda", dtype=torch.int8, generator=gen)
    b = torch.randint(-1, 2, (n, k), device="cuda", dtype=torch.int8, generator=gen)
    return a, b, torch.rand(m, device="cuda", generator=gen) + 0.01, torch.rand((), device="cuda", generator=gen) + 0.01


@pytest.mark.parametrize("per_channel,with_bias,dtype", [(False, False, torch.bfloat16), (True, True, torch.float16)])
def test_int8_matmul_every_tma_config_gives_the_pointer_kernels_bits(device, monkeypatch, per_channel, with_bias,
                                                                     dtype):
    # Each config the autotuner may pick, forced alone (the tests otherwise run the untuned default only): the
    # pointer-store and the two-half descriptor-store epilogues, persistent programs (one or two an SM) walking
    # several tiles with partial tiles in M and N. On the CPU the interpreter's small tile, each epilogue and count.
    import sys

    import triton

    if not _tma_runs_here(device):
        pytest.skip("TMA needs sm_90+")
    im = sys.modules["bitkernels.ops.int8_matmul"]
    if device.type == "cpu":
        small = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "PERSISTENT": True}
        configs = [triton.Config({**small, "TMA_STORE": store, "PROGRAMS_PER_SM": programs}, num_warps=4,
                                 num_stages=1) for programs in (1, 2) for store in (False, True)]
        m, n, k = 37, 40, 96  # 6 tiles on the CPU's 2 "SMs": 2 or 4 programs, some walking several tiles
    else:
        configs = im.config_list(im.TMA_TILES)
        m, n, k = 2100, 2312, 256  # 170 tiles of 128x256 (323 of 128x128) on <= 132 SMs; 52 rows and 8 columns in
        # the last ones
    assert any(c.kwargs["TMA_STORE"] for c in configs) and not all(c.kwargs["TMA_STORE"] for c in configs)
    torch.manual_seed(0)
    a, b = codes(m, k, device=device), codes(n, k, lo=-1, hi=1, device=device)
    sa = torch.rand(m, device=device) + 0.01
    sb = torch.rand(n if per_channel else (), device=device) + 0.01
    bias = torch.randn(n, device=device, dtype=dtype) if with_bias else None
    pointer = ops.int8_matmul(a, b, sa, sb, bias, out_dtype=dtype, tma=False)
    kernel = im._int8_matmul_tma_kernel
    ran = []
    for i, config in enumerate(configs):
        monkeypatch.setattr(kernel, "configs", [config])
        monkeypatch.setattr(kernel, "cache", {})
        monkeypatch.setattr(im, "_TUNED", {})
        try:
            out = ops.int8_matmul(a, b, sa, sb, bias, out_dtype=dtype, tma=True)
        except triton.runtime.errors.OutOfResources:
            # Some tiles need more shared memory at some shapes (on the H100, 256x128x128 at 4 stages storing
            # through pointers when N is not a multiple of 16): the autotuner drops them there. Never the default.
            assert i > 0, config
            continue
        assert torch.equal(out, pointer), config
        assert torch.equal(ops.int8_matmul(a, b, sa, sb, bias, out_dtype=dtype, tma=True), pointer), config  # tuned
        ran.append(config.kwargs["TMA_STORE"])
    assert ran[0] is False and True in ran, ran
    assert {c.kwargs["PROGRAMS_PER_SM"] for c in configs} == {1, 2}


def test_int8_matmul_tma_store_configs_need_aligned_output_rows():
    # A descriptor store needs 16-byte aligned rows: outputs with N not a multiple of 8 (16-bit) keep the others.
    import sys

    import triton

    im = sys.modules["bitkernels.ops.int8_matmul"]
    configs = [triton.Config({"TMA_STORE": store}) for store in (False, True)]
    for n, kept in ((40, 2), (29, 1)):
        out = torch.empty(3, n, dtype=torch.bfloat16)
        assert len(im._prune_tma_store(configs, {"c_ptr": out, "stride_cm": out.stride(0)})) == kept, n


@pytest.mark.gpu
def test_int8_matmul_tma_in_a_cuda_graph():
    # The TMA kernel's descriptors live in scratch memory taken at launch: under capture, from the graph's pool. A
    # replay on new operands (copied into the captured ones) must give the pointer kernel's bits.
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm_90+")
    a, b, sa, sb = _tma_operands(300, 200, 192, 0)
    ops.int8_matmul(a, b, sa, sb, tma=True)  # tunes and compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.int8_matmul(a, b, sa, sb, tma=True)
    for seed in (1, 2):
        for dst, src in zip((a, b, sa, sb), _tma_operands(300, 200, 192, seed)):
            dst.copy_(src)
        graph.replay()
        assert torch.equal(out, ops.int8_matmul(a, b, sa, sb, tma=False)), seed


@pytest.mark.gpu
def test_int8_matmul_tma_scratch_allocator_per_thread():
    # Triton's allocator is a context variable: a new thread starts without one and the TMA launch must set its own;
    # an allocator the user set is used, not replaced.
    import threading

    import triton

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm_90+")
    a, b, sa, sb = _tma_operands(300, 200, 192, 3)
    expected = ops.int8_matmul(a, b, sa, sb, tma=False)
    results, calls = {}, []

    def users_allocator(size, alignment, stream):
        calls.append(size)
        return torch.empty(size, dtype=torch.int8, device="cuda")

    def run(name, allocator):
        try:
            if allocator is not None:
                triton.set_allocator(allocator)
            results[name] = [torch.equal(ops.int8_matmul(a, b, sa, sb, tma=True), expected) for _ in range(2)]
        except Exception as error:  # reported below, in the test's thread
            results[name] = error

    for name, allocator in (("fresh thread", None), ("user's allocator", users_allocator)):
        thread = threading.Thread(target=run, args=(name, allocator))
        thread.start()
        thread.join()
    assert results == {"fresh thread": [True, True], "user's allocator": [True, True]}, results
    assert len(calls) == 2 and all(size > 0 for size in calls)


def test_int8_matmul_tma_needs_aligned_rows(device):
    from bitkernels.ops.int8_matmul import tma_layout_ok

    a, b = codes(4, 33, device=device), codes(3, 33, lo=-1, hi=1, device=device)
    one = torch.ones(4, device=device)
    with pytest.raises(ValueError, match="16-byte aligned"):
        ops.int8_matmul(a, b, one, torch.ones((), device=device), tma=True)
    wide = codes(4, 48, device=device)
    assert tma_layout_ok(wide) and not tma_layout_ok(wide[:, 1:]) and not tma_layout_ok(wide.t())
    from bitkernels.ops.int8_matmul import prefer_tma

    assert not prefer_tma(wide[:, 1:33], b[:, :32].contiguous())  # misaligned rows (and on the CPU: no TMA at all)
    # the automatic choice takes the pointer kernel for such views, with the same result
    out = ops.int8_matmul(wide[:, 1:33], b[:, :32].contiguous(), one, torch.ones((), device=device),
                          out_dtype=torch.float32)
    exact = wide[:, 1:33].double() @ b[:, :32].double().t()
    assert torch.equal(out.double(), exact)


@pytest.mark.parametrize("k", [300, 304])  # 304: a multiple of 16, so the TMA kernel where it runs
def test_int8_matmul_full_int8_range_is_exact(device, k):
    # -128 * -1 summed over K: the int32 accumulator must not saturate or round (fp32 output, unit scales).
    a = torch.full((4, k), -128, dtype=torch.int8, device=device)
    b = torch.full((3, k), -1, dtype=torch.int8, device=device)
    one = torch.ones(4, device=device)
    out = ops.int8_matmul(a, b, one, torch.ones((), device=device), out_dtype=torch.float32)
    assert torch.equal(out, torch.full((4, 3), 128.0 * k, device=device))


def test_int8_matmul_empty(device):
    a, b = codes(0, 8, device=device), codes(5, 8, device=device)
    assert ops.int8_matmul(a, b, torch.ones(0, device=device), torch.ones((), device=device)).shape == (0, 5)


@pytest.mark.parametrize("m,k", [(1, 5), (19, 45), (40, 600), (0, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_int8_matches_reference_exactly(device, m, k, dtype):
    # codes * scale in fp32, one rounding to dtype: bit-identical to the reference (per-row and per-tensor scale;
    # 600 columns cross the kernel's 512-wide tile, 19/40 rows its 16-row tile)
    q = codes(m, k, device=device)
    for s in (torch.rand(m, device=device) + 0.01, torch.rand((), device=device) * 3):
        out = ops.dequantize_int8(q, s, dtype)
        assert out.dtype == dtype and out.shape == (m, k)
        assert torch.equal(out, ref.dequantize_int8(q, s, dtype))
    assert torch.equal(ops.dequantize_int8(q.t().contiguous().t(), torch.ones(m, device=device), dtype),
                       q.to(dtype))  # a column-major view is read correctly


def test_dequantize_int8_bad_input(device):
    with pytest.raises(TypeError, match="2-D int8"):
        ops.dequantize_int8(torch.zeros(3, 4, device=device), torch.ones(3, device=device), torch.float32)
    with pytest.raises(ValueError, match="2 entries for 3 rows"):
        ops.dequantize_int8(codes(3, 4, device=device), torch.ones(2, device=device), torch.float32)


@pytest.mark.parametrize("m,n,k", [(1, 3, 5), (19, 33, 45)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_gemms_match_reference(device, m, n, k, dtype):
    # grad_x = dy @ (Wq * s) (s per tensor or per output row) and grad_W = dy^T @ (xq * a): the dequantized operand
    # must equal the reference's fake-quantized tensor rounded to the gradient's dtype.
    dy = torch.randn(m, n, device=device, dtype=dtype)
    wq, xq = codes(n, k, lo=-1, hi=1, device=device), codes(m, k, device=device)
    a = torch.rand(m, device=device) + 0.01
    for s in (torch.rand((), device=device) + 0.1, torch.rand(n, device=device) + 0.1):
        w_deq = (wq.float() * (s[:, None] if s.dim() else s)).to(dtype)
        gx = ops.bitlinear_grad_input(dy, wq, s)
        assert gx.dtype == dtype and gx.shape == (m, k)
        assert rel(gx, dy.double() @ w_deq.double()) <= TOL[dtype]
        torch.testing.assert_close(gx, ref.bitlinear_grad_input(dy, wq, s))
    x_deq = ops.dequantize_int8(xq, a, dtype)
    gw = ops.bitlinear_grad_weight(dy, x_deq, torch.float32)
    assert gw.dtype == torch.float32 and gw.shape == (n, k)
    assert rel(gw, dy.double().t() @ (xq.float() * a[:, None]).to(dtype).double()) <= TOL[dtype]
    torch.testing.assert_close(gw, ref.bitlinear_grad_weight(dy, x_deq, torch.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(8192, 3072, 1024), (8192, 2560, 9728), (2048, 6144, 2048), (1, 2560, 9728),
                                   (1000, 3000, 1000)])
def test_int8_matmul_realistic(device, m, n, k):
    a, b = codes(m, k, device=device), codes(n, k, lo=-1, hi=1, device=device)
    sa, sb = torch.rand(m, device=device) / 127, torch.rand((), device=device)
    out = ops.int8_matmul(a, b, sa, sb, out_dtype=torch.bfloat16)
    exact = (a.double() @ b.double().t()) * (sa.double() * sb.double())[:, None]
    assert rel(out, exact) <= 4e-3
    if k % 16 == 0 and _tma_runs_here(device):  # both kernels, whichever the automatic choice: the same bits
        for tma in (True, False):
            assert torch.equal(out, ops.int8_matmul(a, b, sa, sb, out_dtype=torch.bfloat16, tma=tma))
    dy = torch.randn(m, n, device=device, dtype=torch.bfloat16)
    gx = ops.bitlinear_grad_input(dy, b, sb)
    assert rel(gx, dy.float() @ (b.float() * sb).bfloat16().float()) <= 8e-3
    gw = ops.bitlinear_grad_weight(dy, ops.dequantize_int8(a, sa, torch.bfloat16), torch.bfloat16)
    assert rel(gw, dy.float().t() @ (a.float() * sa[:, None]).bfloat16().float()) <= 8e-3

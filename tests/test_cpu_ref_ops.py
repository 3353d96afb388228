"""cpu_ref.ops and the C++ kernels: exact int32 products, activation / SubLN quantization as the reference, the
head GEMV, the C layer ops (norms, SwiGLU, attention) against torch, and the build's error paths."""

import pytest
import torch

from bitkernels.reference import bitlinear as ref_bitlinear
from bitkernels.reference import quantize_activations_int8, rmsnorm_quantize_int8, ternarize_absmean
from cpu_ref import _build, ops
from cpu_ref.packing import pack_i2
from cpu_ref_helpers import random_codes


# ---------------------------------------------------------------- kernel

def test_kernel_builds_for_this_cpu():
    assert _build.isa() in ("avx512vnni", "avx2", "scalar")


def _cpu_flags() -> set[str]:
    try:
        return set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        return set()


@pytest.mark.parametrize("march,isa,needs", [("haswell", "avx2", {"avx2", "fma", "f16c"}), ("x86-64", "scalar", set())])
def test_kernel_built_for_an_older_target_passes_the_same_tests(march, isa, needs, tmp_path):
    """BITKERNELS_CPU_MARCH builds the AVX2 or scalar paths on a newer CPU; the kernel and layer-op tests of this file
    then run against that build in a child process (one library per process)."""
    import os
    import pathlib
    import platform
    import subprocess
    import sys

    if platform.machine() != "x86_64" or not needs <= _cpu_flags():
        pytest.skip(f"-march={march} does not run on this CPU")
    env = {**os.environ, "BITKERNELS_CPU_MARCH": march, "BITKERNELS_CACHE": str(tmp_path)}
    root = pathlib.Path(__file__).resolve().parent.parent
    got = subprocess.run([sys.executable, "-c", "from cpu_ref import _build; print(_build.isa())"], env=env,
                         cwd=root, capture_output=True, text=True)
    assert got.returncode == 0 and got.stdout.strip() == isa, got.stderr[-2000:]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                          "int32 or bitlinear_packed or one_token or head_gemv or layer_ops"], env=env, cwd=root,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:]
    assert " passed" in run.stdout and " failed" not in run.stdout


def test_bad_march_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("BITKERNELS_CPU_MARCH", "native; rm -rf /")
    with pytest.raises(_build.KernelBuildError, match="not a -march target"):
        _build.library_path()


@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (1, 7, 5), (2, 4, 256), (3, 13, 300), (4, 33, 513), (5, 64, 1024),
                                   (9, 9, 777), (1, 130, 2049), (17, 5, 64), (0, 8, 16)])
def test_kernel_int32_is_exact(m, n, k):
    codes = random_codes(n, k, seed=m + n + k)
    g = torch.Generator().manual_seed(k)
    x = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    expect = x.to(torch.int32) @ codes.to(torch.int32).T
    got = ops.ternary_gemm_int32(x, pack_i2(codes), k)
    assert got.dtype == torch.int32 and torch.equal(got, expect)


def test_kernel_int32_extremes_do_not_saturate():
    # |sum| = 128 * 4096 needs 20 bits: exact in int32, would overflow any int16 intermediate.
    k = 4096
    x = torch.full((2, k), -128, dtype=torch.int8)
    x[1] = 127
    for fill in (-1, 1):
        codes = torch.full((5, k), fill, dtype=torch.int8)
        expect = x.to(torch.int32) @ codes.to(torch.int32).T
        assert torch.equal(ops.ternary_gemm_int32(x, pack_i2(codes), k), expect)


def test_kernel_same_result_any_thread_count():
    codes, x = random_codes(37, 600, seed=3), torch.randint(-128, 128, (6, 600), dtype=torch.int8)
    p = pack_i2(codes)
    assert torch.equal(ops.ternary_gemm_int32(x, p, 600, n_threads=1), ops.ternary_gemm_int32(x, p, 600, n_threads=2))


@pytest.mark.parametrize("k", [1, 5, 64, 300, 1024])
def test_kernel_activation_quantization_matches_reference(k):
    x = torch.randn(7, k) * torch.logspace(-3, 2, 7).unsqueeze(1)
    x[0] = 0.0  # all-zero row: the eps floor
    codes, scale = ops.quantize_activations(x)
    ref_codes, ref_scale = quantize_activations_int8(x)
    assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale)


def test_kernel_rmsnorm_quantization_close_to_reference():
    # The RMS sum order differs from torch's: the scale may differ in the last bits, a code by at most one step.
    x, w = torch.randn(64, 300) * 3, torch.rand(300) + 0.5
    codes, scale = ops.quantize_activations(x, w, 1e-6)
    ref_codes, ref_scale = rmsnorm_quantize_int8(x, w, 1e-6)
    torch.testing.assert_close(scale, ref_scale, rtol=1e-6, atol=0)
    assert (codes.int() - ref_codes.int()).abs().max() <= 1
    assert (codes != ref_codes).float().mean() < 1e-3


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("m,n,k", [(1, 24, 64), (5, 33, 300), (3, 256, 513)])
def test_bitlinear_packed_matches_reference(m, n, k, per_channel):
    torch.manual_seed(m * n + k)
    w, b, x = torch.randn(n, k), torch.randn(n), torch.randn(2, m, k)
    codes, scale = ternarize_absmean(w, per_channel)
    y = ops.bitlinear_packed(x, pack_i2(codes), scale, k, bias=b)
    assert y.shape == (2, m, n) and y.dtype == torch.float32
    torch.testing.assert_close(y, ref_bitlinear(x, w, b, per_channel=per_channel), rtol=1e-5, atol=1e-5)
    # The same through the exact integer product, scaled by hand.
    xc, xs = quantize_activations_int8(x.reshape(-1, k))
    acc = ops.ternary_gemm_int32(xc, pack_i2(codes), k).float()
    torch.testing.assert_close(y.reshape(-1, n), acc * (xs.unsqueeze(1) * scale.reshape(1, -1)) + b, rtol=1e-6,
                               atol=1e-6)


def test_bitlinear_packed_with_subln_close_to_reference():
    torch.manual_seed(1)
    n, k = 48, 320
    w, x, nw = torch.randn(n, k), torch.randn(9, k), torch.rand(k) + 0.5
    codes, scale = ternarize_absmean(w)
    y = ops.bitlinear_packed(x, pack_i2(codes), scale, k, norm_weight=nw, norm_eps=1e-6)
    ref = ref_bitlinear(x, w, None, nw, 1e-6)
    # A rare activation code one step off moves an output by at most scale * amax/127 per flipped element.
    torch.testing.assert_close(y, ref, rtol=0, atol=2e-2 * float(ref.abs().max()))


def test_ops_reject_bad_inputs():
    p = pack_i2(random_codes(4, 10))
    with pytest.raises(ValueError, match="int8"):
        ops.ternary_gemm_int32(torch.zeros(2, 10), p, 10)
    with pytest.raises(ValueError, match="columns"):
        ops.ternary_gemm_int32(torch.zeros(2, 9, dtype=torch.int8), p, 10)
    with pytest.raises(ValueError, match="in_features"):
        ops.bitlinear_packed(torch.zeros(2, 11), p, torch.tensor(1.0), 10)
    with pytest.raises(ValueError, match="uint8"):
        ops.bitlinear_packed(torch.zeros(2, 10), p.to(torch.int8), torch.tensor(1.0), 10)
    with pytest.raises(ValueError, match="bytes a row"):
        ops.bitlinear_packed(torch.zeros(2, 300), p, torch.tensor(1.0), 300)


def test_missing_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(_build.shutil, "which", lambda name: None)
    with pytest.raises(_build.KernelBuildError, match="C\\+\\+ compiler"):
        _build.library_path()


def test_compile_error_is_reported(monkeypatch, tmp_path):
    bad = tmp_path / "kernel.cpp"
    bad.write_text("this is not C++")
    monkeypatch.setattr(_build, "SOURCE", bad)
    monkeypatch.setenv("BITKERNELS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(_build.KernelBuildError, match="building the cpu_ref kernel failed"):
        _build.build()


# ---------------------------------------------------------------- kernel: one-token stream, exact SubLN, heads

@pytest.mark.parametrize("n,k", [(16, 256), (48, 1024), (37, 300), (130, 2049), (3, 64)])
def test_kernel_one_token_stream_is_exact_any_thread_count(n, k):
    # M = 1 takes the row-streaming path (16-row slabs + a scalar tail), M > 1 the 4 x 4 tile: both exact.
    codes = random_codes(n, k, seed=n + k)
    x = torch.randint(-128, 128, (1, k), generator=torch.Generator().manual_seed(n), dtype=torch.int8)
    expect = x.to(torch.int32) @ codes.to(torch.int32).T
    p = pack_i2(codes)
    for threads in (1, 2, 3):
        assert torch.equal(ops.ternary_gemm_int32(x, p, k, n_threads=threads), expect)


def test_bitlinear_packed_subln_with_mean_square_equals_reference_exactly():
    # Given torch's mean square (as bitkernels.reference.rmsnorm computes it), the kernel's RMSNorm + quantization
    # is IEEE-exact elementwise work: the output equals the exact integer product of the reference's codes.
    torch.manual_seed(4)
    n, k = 40, 320
    w, x, nw = torch.randn(n, k), torch.randn(2, 9, k) * 3, torch.rand(k) + 0.5
    codes, scale = ternarize_absmean(w)
    ms = x.pow(2).mean(dim=-1, keepdim=True)
    y = ops.bitlinear_packed(x, pack_i2(codes), scale, k, norm_weight=nw, norm_eps=1e-6, norm_ms=ms)
    xc, xs = rmsnorm_quantize_int8(x.reshape(-1, k), nw, 1e-6)
    acc = (xc.to(torch.int32) @ codes.to(torch.int32).T).float()
    assert torch.equal(y.reshape(-1, n), acc * (xs.unsqueeze(1) * scale))
    c2, s2 = ops.quantize_activations(x.reshape(-1, k), nw, 1e-6, norm_ms=ms)
    assert torch.equal(c2, xc) and torch.equal(s2, xs)
    with pytest.raises(ValueError, match="norm_ms"):
        ops.bitlinear_packed(x, pack_i2(codes), scale, k, norm_weight=nw, norm_ms=ms[:, :3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k,m", [(37, 1, 1), (5, 15, 2), (70, 17, 1), (33, 100, 3), (300, 1024, 1), (9, 1031, 8)])
def test_head_gemv_matches_float64(dtype, n, k, m):
    g = torch.Generator().manual_seed(n * k + m)
    w, x = torch.randn(n, k, generator=g).to(dtype), torch.randn(2, m, k, generator=g)
    y = ops.head_gemv(x, w)
    assert y.shape == (2, m, n) and y.dtype == torch.float32
    exact = x.double() @ w.double().T  # bf16 -> fp32 is exact: the only error is float32 summation
    bound = 4 * k * 2.0 ** -24 * (x.double().abs() @ w.double().abs().T) + 1e-30
    assert bool(((y.double() - exact).abs() <= bound).all())
    assert torch.equal(ops.head_gemv(x, w, n_threads=1), ops.head_gemv(x, w, n_threads=3))  # deterministic


def test_head_gemv_rejects_bad_inputs():
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        ops.head_gemv(torch.zeros(1, 4), torch.zeros(3, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="columns"):
        ops.head_gemv(torch.zeros(1, 5), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="contiguous"):
        ops.head_gemv(torch.zeros(1, 3), torch.zeros(4, 3).T)


def test_kernel_head_module_many_rows_is_torch_linear():
    from cpu_ref.model import KernelHead

    w = torch.randn(50, 64)
    head = KernelHead(w, max_kernel_rows=4)
    x = torch.randn(1, 9, 64)
    assert torch.equal(head(x), torch.nn.functional.linear(x, w))  # prefill: exactly nn.Linear
    torch.testing.assert_close(head(x[:, :2]), torch.nn.functional.linear(x[:, :2], w), rtol=1e-5, atol=1e-5)


def test_prepared_bitlinear_follows_replaced_buffers():
    # The cached kernel call of a PackedBitLinear holds raw pointers: replacing a buffer must rebuild it.
    from cpu_ref.model import PackedBitLinear

    c1, c2 = random_codes(24, 300, seed=1), random_codes(24, 300, seed=2)
    layer = PackedBitLinear(300, 24, pack_i2(c1), torch.tensor(0.5))
    x = torch.randn(3, 300)
    y1 = layer(x)
    layer.qweight = pack_i2(c2)
    xc, xs = quantize_activations_int8(x)
    expect = (xc.to(torch.int32) @ c2.to(torch.int32).T).float() * (xs.unsqueeze(1) * 0.5)
    assert torch.equal(layer(x), expect) and not torch.equal(y1, expect)
    with pytest.raises(ValueError, match="in_features"):
        layer(torch.randn(3, 299))


def test_struct_layouts_match_the_library():
    import ctypes

    from cpu_ref.layer_ops import AttnDesc
    from cpu_ref.ops import _LinearDesc

    lib = _build.load()
    assert lib.tk_linear_desc_size() == ctypes.sizeof(_LinearDesc)
    assert lib.tk_attn_desc_size() == ctypes.sizeof(AttnDesc)


# ---------------------------------------------------------------- C layer ops vs torch

def _hf_rms(x, w, eps):
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_layer_ops_norm_and_swiglu_match_torch(dtype):
    from cpu_ref import layer_ops

    if not layer_ops.available():
        pytest.skip("the C layer ops need an AVX-512 or AVX2 build")
    g = torch.Generator().manual_seed(11)
    h, delta = (torch.randn(1024, generator=g) * 2).to(dtype), torch.randn(1024, generator=g).to(dtype)
    w = (torch.rand(1024, generator=g) + 0.5).to(dtype)
    out = layer_ops.add_rmsnorm(h_c := h.clone(), delta, w, 1e-6)
    assert torch.equal(h_c, h + delta)  # the residual add: one rounding, as torch's
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), _hf_rms(h + delta, w, 1e-6).float(), rtol=tol, atol=tol)
    gu = (torch.randn(2 * 320, generator=g) * 3).to(dtype)
    ref = torch.nn.functional.silu(gu[:320]) * gu[320:]
    torch.testing.assert_close(layer_ops.swiglu(gu).float(), ref.float(), rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="multiple of 16"):
        layer_ops.add_rmsnorm(torch.zeros(24, dtype=dtype), None, torch.ones(24, dtype=dtype), 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_layer_ops_attention_matches_sdpa(dtype):
    from cpu_ref import layer_ops

    if not layer_ops.available():
        pytest.skip("the C layer ops need an AVX-512 or AVX2 build")
    hq, hk, d, max_len = 8, 2, 64, 40
    g = torch.Generator().manual_seed(12)
    kc, vc = torch.zeros(hk, max_len, d, dtype=dtype), torch.zeros(hk, max_len, d, dtype=dtype)
    qn, kn = (torch.rand(d, generator=g) + 0.5).to(dtype), (torch.rand(d, generator=g) + 0.5).to(dtype)
    desc = layer_ops.make_attn_desc(dtype, hq, hk, d, qn, kn, 1e-6, d ** -0.5, kc, vc)
    k_ref, v_ref = torch.zeros(1, hk, max_len, d, dtype=dtype), torch.zeros(1, hk, max_len, d, dtype=dtype)
    inv_freq = 1.0 / (1e4 ** (torch.arange(0, d, 2).float() / d))

    def rot(x):
        return torch.cat((-x[..., d // 2:], x[..., :d // 2]), -1)

    for pos in range(max_len):
        qkv = torch.randn((hq + 2 * hk) * d, generator=g).to(dtype)
        emb = torch.cat([pos * inv_freq, pos * inv_freq])
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        out = layer_ops.attn_decode(desc, qkv, cos, sin, pos, n_threads=1)
        assert torch.equal(out, layer_ops.attn_decode(desc, qkv, cos, sin, pos, n_threads=3))
        q = _hf_rms(qkv[:hq * d].view(1, hq, 1, d), qn, 1e-6)
        k = _hf_rms(qkv[hq * d:(hq + hk) * d].view(1, hk, 1, d), kn, 1e-6)
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        k_ref[:, :, pos], v_ref[:, :, pos] = k[:, :, 0], qkv[(hq + hk) * d:].view(1, hk, d)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k_ref[:, :, :pos + 1], v_ref[:, :, :pos + 1],
                                                               enable_gqa=True)
        tol = 2e-6 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.float(), ref.reshape(-1).float(), rtol=tol, atol=tol)
    torch.testing.assert_close(kc.float(), k_ref[0].float(), rtol=1e-6 if dtype == torch.float32 else 1e-2, atol=1e-6)
    assert torch.equal(vc, v_ref[0])
    with pytest.raises(ValueError, match="pos"):
        layer_ops.attn_decode(desc, qkv, cos, sin, max_len)
    with pytest.raises(ValueError, match="head_dim"):
        layer_ops.make_attn_desc(dtype, hq, hk, 24, None, None, 1e-6, 1.0, kc, vc)

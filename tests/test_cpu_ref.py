"""cpu_ref: packings (lossless, validated), the C++ kernel (exact int32), the packed model (same greedy tokens as the
PyTorch student), the on-disk format (corrupt / truncated files -> clear errors) and the build's error path."""
import json
import pathlib
import struct

import pytest
import torch

from bitkernels.reference import bitlinear as ref_bitlinear
from bitkernels.reference import quantize_activations_int8, rmsnorm_quantize_int8, ternarize_absmean
from cpu_ref import PackingError, load_packed, pack_model, save_packed
from cpu_ref import _build, ops
from cpu_ref.packing import pack_i2, pack_tq1, packed_shape, unpack_i2, unpack_tq1
from cpu_ref.runner import classify, greedy_generate

K_SIZES = [1, 2, 3, 4, 5, 6, 7, 63, 64, 65, 255, 256, 257, 300, 513, 1029]


def random_codes(n, k, seed=0, p_zero=0.4):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    return codes * (torch.rand(n, k, generator=g) > p_zero).to(torch.int8)


# ---------------------------------------------------------------- packing

@pytest.mark.parametrize("k", K_SIZES)
@pytest.mark.parametrize("n", [1, 3, 8])
def test_i2_round_trip(n, k):
    codes = random_codes(n, k, seed=n * 1000 + k)
    packed = pack_i2(codes)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == packed_shape("i2", n, k)
    assert torch.equal(unpack_i2(packed, k), codes)


@pytest.mark.parametrize("k", K_SIZES)
@pytest.mark.parametrize("n", [1, 3, 8])
def test_tq1_round_trip(n, k):
    codes = random_codes(n, k, seed=n * 1000 + k + 7)
    packed = pack_tq1(codes)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (n, -(-k // 5))
    assert int(packed.max()) <= 242
    assert torch.equal(unpack_tq1(packed, k), codes)


def test_packing_layouts_are_the_documented_ones():
    # i2: byte j of a 256-block holds weights j, j+64, j+128, j+192 in bits 0-1, 2-3, 4-5, 6-7 as code + 1.
    codes = torch.zeros(1, 256, dtype=torch.int8)
    codes[0, 5], codes[0, 5 + 64], codes[0, 5 + 128], codes[0, 5 + 192] = 1, -1, 0, 1
    assert pack_i2(codes)[0, 5].item() == 2 | (0 << 2) | (1 << 4) | (2 << 6)
    assert pack_i2(codes)[0, 6].item() == 0b01010101  # all zeros -> q = 1 everywhere
    # tq1: byte i = sum_j (code_{5i+j} + 1) 3^j; padding is code 0.
    assert pack_tq1(torch.tensor([[1, -1, 0, 1, -1, 1]], dtype=torch.int8)).tolist() == [[2 + 0 + 9 + 54 + 0, 2 + 3 + 9 + 27 + 81]]


def test_all_ternary_patterns_round_trip():
    # Every one of the 3^5 = 243 five-trit patterns, in both packings.
    v = torch.arange(243)
    codes = torch.stack([(v // 3 ** j) % 3 - 1 for j in range(5)], dim=1).reshape(1, -1).to(torch.int8)
    assert torch.equal(unpack_tq1(pack_tq1(codes), codes.shape[1]), codes)
    assert torch.equal(unpack_i2(pack_i2(codes), codes.shape[1]), codes)


def test_pack_rejects_bad_codes():
    with pytest.raises(TypeError, match="int8"):
        pack_i2(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="ternary"):
        pack_i2(torch.tensor([[0, 2]], dtype=torch.int8))
    with pytest.raises(ValueError, match="2-D"):
        pack_tq1(torch.zeros(4, dtype=torch.int8))


def test_unpack_rejects_corrupt_data():
    packed = pack_i2(random_codes(2, 300))
    bad = packed.clone()
    bad[1, 3] |= 0b11000000  # the 2-bit value 3 is no code
    with pytest.raises(PackingError, match="value 3"):
        unpack_i2(bad, 300)
    with pytest.raises(PackingError, match="shape"):
        unpack_i2(packed[:, :-1], 300)
    bad = packed.clone()
    bad[0, -1] = 0  # padding past K=300 must be code 0 (q = 1)
    with pytest.raises(PackingError, match="padding"):
        unpack_i2(bad, 300)
    t = pack_tq1(random_codes(2, 12))
    t[0, 0] = 250
    with pytest.raises(PackingError, match="> 242"):
        unpack_tq1(t, 12)
    with pytest.raises(PackingError, match="shape"):
        unpack_tq1(pack_tq1(random_codes(2, 12)), 16)


# ---------------------------------------------------------------- kernel

def test_kernel_builds_for_this_cpu():
    assert _build.isa() in ("avx512vnni", "avx2", "scalar")


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


# ---------------------------------------------------------------- packed model

TINY = dict(vocab_size=384, hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=24, max_position_embeddings=256)


def tiny_student(tie=True, seed=0):
    transformers = pytest.importorskip("transformers")
    from bitdistill.convert import convert_to_bitnet

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.Qwen3Config(**TINY, tie_word_embeddings=tie), dtype=torch.float32).eval()
    convert_to_bitnet(model, subln=True, quantize=True, backend="torch")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("subln.weight"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def student():
    return tiny_student()


@pytest.mark.parametrize("packing", ["i2", "tq1"])
def test_packed_model_same_greedy_tokens_and_logits(student, packing, tmp_path):
    save_packed(student, tmp_path, packing=packing)
    packed = load_packed(tmp_path)
    n_packed = sum(type(m).__name__ == "PackedBitLinear" for m in packed.modules())
    assert n_packed == 7 * TINY["num_hidden_layers"]
    prompt = torch.randint(0, TINY["vocab_size"], (1, 11), generator=torch.Generator().manual_seed(5))
    ref = greedy_generate(student, prompt, 24)["tokens"]
    got = greedy_generate(packed, prompt, 24)["tokens"]
    assert torch.equal(ref, got)
    with torch.inference_mode():
        lr, lp = student(input_ids=prompt).logits, packed(input_ids=prompt).logits
    torch.testing.assert_close(lp, lr, rtol=0, atol=2e-2 * float(lr.abs().max()))
    labels = [3, 17, 99]
    prompts = [torch.randint(0, TINY["vocab_size"], (n,)) for n in (4, 9, 13)]
    pred_ref, lg_ref = classify(student, prompts, labels)
    pred, lg = classify(packed, prompts, labels)
    assert pred == pred_ref
    torch.testing.assert_close(lg, lg_ref, rtol=0, atol=2e-2 * float(lg_ref.abs().max()))


@pytest.mark.parametrize("tie", [True, False])
def test_packed_model_equals_exact_integer_reference_bit_for_bit(tie, tmp_path):
    from cpu_ref.reference import exact_reference

    student = tiny_student(tie=tie, seed=3)
    exact = exact_reference(student)
    save_packed(student, tmp_path)
    packed = load_packed(tmp_path)
    prompt = torch.randint(0, TINY["vocab_size"], (1, 19), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        assert torch.equal(packed(input_ids=prompt).logits, exact(input_ids=prompt).logits)
    assert torch.equal(greedy_generate(packed, prompt, 32)["tokens"], greedy_generate(exact, prompt, 32)["tokens"])


def test_pack_model_in_place_untied_and_from_pipeline_save(tmp_path):
    from bitdistill.convert import load_student

    student = tiny_student(tie=False, seed=2)
    student.save_pretrained(tmp_path / "student")
    loaded = load_student(tmp_path / "student", backend="torch")
    prompt = torch.randint(0, TINY["vocab_size"], (1, 7), generator=torch.Generator().manual_seed(1))
    ref = greedy_generate(loaded, prompt, 12)["tokens"]
    names = pack_model(loaded)
    assert len(names) == 7 * TINY["num_hidden_layers"] and all(".layers." in n for n in names)
    assert torch.equal(greedy_generate(loaded, prompt, 12)["tokens"], ref)
    save_packed(loaded, tmp_path / "packed")  # from PackedBitLinear layers this time
    reloaded = load_packed(tmp_path / "packed")
    assert torch.equal(greedy_generate(reloaded, prompt, 12)["tokens"], ref)


def test_packed_weight_bytes_eighth_of_fp16(student, tmp_path):
    from cpu_ref import linear_weight_bytes

    save_packed(student, tmp_path, packing="i2")
    b = linear_weight_bytes(load_packed(tmp_path))
    # Each row padded to 256 weights (64 bytes), plus one fp32 scale per matrix.
    rows_bytes = sum(n * -(-k // 256) * 64 + 4 for n, k in [(96, 96), (48, 96), (48, 96), (96, 96), (200, 96),
                                                            (200, 96), (96, 200)]) * 2
    assert b["i2"] == rows_bytes


def _header(path):
    raw = pathlib.Path(path).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return raw, n, json.loads(raw[8:8 + n])


def test_truncated_file_is_a_clear_error(student, tmp_path):
    save_packed(student, tmp_path)
    f = tmp_path / "cpu_ref.safetensors"
    raw = f.read_bytes()
    f.write_bytes(raw[: len(raw) - 1000])
    with pytest.raises(PackingError, match="truncated or corrupt"):
        load_packed(tmp_path)


def test_flipped_weight_byte_fails_crc(student, tmp_path):
    save_packed(student, tmp_path)
    f = tmp_path / "cpu_ref.safetensors"
    raw, n, header = _header(f)
    # gate and up are stored stacked: a byte in the up rows (after the gate's) must fail up_proj's own crc32.
    linears = json.loads(header["__metadata__"]["linears"])
    assert linears["model.layers.0.mlp.up_proj"]["stacked"] == {"tensor": "model.layers.0.mlp.gate_up_proj.qweight",
                                                                 "row": TINY["intermediate_size"]}
    begin = header["model.layers.0.mlp.gate_up_proj.qweight"]["data_offsets"][0]
    raw = bytearray(raw)
    pos = 8 + n + begin + TINY["intermediate_size"] * 64 + 3
    raw[pos] = raw[pos] ^ 0b00000101  # still valid 2-bit codes: only the checksum sees it
    f.write_bytes(bytes(raw))
    with pytest.raises(PackingError, match="up_proj.qweight fails its crc32"):
        load_packed(tmp_path)


def test_wrong_format_or_missing_file_is_a_clear_error(student, tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="cpu_ref.safetensors"):
        load_packed(tmp_path)
    save_packed(student, tmp_path)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "cpu_ref.safetensors"), metadata={"format": "pt"})
    with pytest.raises(PackingError, match="format"):
        load_packed(tmp_path)


def test_cli_pack_generate_check_classify(tmp_path, capsys):
    from cpu_ref.__main__ import main

    tiny_student(seed=4).save_pretrained(tmp_path / "student")
    assert main(["pack", str(tmp_path / "student"), str(tmp_path / "packed"), "--packing", "tq1"]) == 0
    assert main(["generate", str(tmp_path / "packed"), "--ids", "1,2,3,4", "--max-new-tokens", "6",
                 "--check", str(tmp_path / "student")]) == 0
    assert "same greedy tokens as the PyTorch student: True" in capsys.readouterr().err
    assert main(["classify", str(tmp_path / "packed"), "--ids", "5,6,7", "--label-ids", "10,20"]) == 0
    assert capsys.readouterr().out.strip() in ("10", "20")


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


# ---------------------------------------------------------------- fused q/k/v and gate/up

@pytest.mark.parametrize("per_channel", [False, True])
def test_fused_projections_equal_parts_and_integer_twin_bit_for_bit(per_channel, tmp_path):
    from bitdistill.convert import convert_to_bitnet
    from cpu_ref.fuse import FusedProduct, projection_groups, stacked_rows
    from cpu_ref.reference import exact_reference

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(6)
    model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen3Config(**TINY), dtype=torch.float32)
    convert_to_bitnet(model.eval(), subln=True, quantize=True, per_channel=per_channel, backend="torch")
    with torch.no_grad():  # different scales per part, so a wrong per-row scale would show
        model.model.layers[0].self_attn.k_proj.weight.mul_(3.0)
    save_packed(model, tmp_path)
    packed, exact = load_packed(tmp_path), exact_reference(model)
    x = torch.randn(1, 5, TINY["hidden_size"])
    for layer, twin in zip(packed.model.layers, exact.model.layers):
        for parts, twin_parts in zip(projection_groups(layer), projection_groups(twin)):
            stacked = stacked_rows([p.qweight for p in parts])
            assert stacked is not None and stacked.data_ptr() == parts[0].qweight.data_ptr()  # one buffer, no copy
            fused = FusedProduct(parts)
            assert fused.kind == "packed"
            (y,) = fused(x)
            assert torch.equal(y, torch.cat([p(x) for p in parts], dim=-1))
            assert torch.equal(y, torch.cat([p(x) for p in twin_parts], dim=-1))


def test_fuse_projections_on_plain_linears_keeps_outputs_and_is_idempotent():
    from cpu_ref.fuse import fuse_projections, stacked_rows

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(7)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.Qwen2Config(**TINY), dtype=torch.float32).eval()  # Qwen2: q/k/v with biases
    ids = torch.randint(0, TINY["vocab_size"], (1, 9))
    with torch.inference_mode():
        before = model(input_ids=ids).logits
    assert fuse_projections(model) == 2 * TINY["num_hidden_layers"]
    attn = model.model.layers[1].self_attn
    stacked = stacked_rows([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    assert stacked is not None
    ptr = stacked.data_ptr()
    assert fuse_projections(model) == 2 * TINY["num_hidden_layers"] and attn.q_proj.weight.data_ptr() == ptr
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, before)


# ---------------------------------------------------------------- lean decode loop vs the HF forward

FAST = dict(TINY, intermediate_size=192, head_dim=32)  # sizes the C layer ops take (multiples of 16, head_dim 32)


def _hf_steps(model, tokens, prompt_len):
    """Logits of the prompt's last position, then of each further token, through HF's forward + DynamicCache."""
    from transformers import DynamicCache

    cache, out = DynamicCache(), []
    with torch.inference_mode():
        out.append(model(input_ids=tokens[:, :prompt_len], past_key_values=cache, use_cache=True).logits[:, -1])
        for j in range(prompt_len, tokens.shape[1]):
            out.append(model(input_ids=tokens[:, j:j + 1], past_key_values=cache, use_cache=True).logits[:, -1])
    return out


def _lean_steps(decoder, tokens, prompt_len):
    out = [decoder(tokens[:, :prompt_len])]
    out += [decoder(tokens[:, j:j + 1]) for j in range(prompt_len, tokens.shape[1])]
    return out


@pytest.mark.parametrize("arch", ["qwen3", "llama", "qwen2"])
@pytest.mark.parametrize("fast", [True, False])
def test_lean_loop_matches_hf_forward_fp32(arch, fast):
    from cpu_ref.decoder import LeanDecoder

    transformers = pytest.importorskip("transformers")
    config_cls = {"qwen3": transformers.Qwen3Config, "llama": transformers.LlamaConfig,
                  "qwen2": transformers.Qwen2Config}[arch]
    torch.manual_seed(8)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**FAST), dtype=torch.float32).eval()
    with torch.no_grad():  # norm gains and biases away from their init, so that a skipped one would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_()
    prompt = torch.randint(0, FAST["vocab_size"], (1, 10), generator=torch.Generator().manual_seed(3))
    ref = greedy_generate(model, prompt, 20, loop="hf")
    got = greedy_generate(model, prompt, 20, loop="lean")
    assert got["loop"] == "lean" and torch.equal(got["tokens"], ref["tokens"])
    decoder = LeanDecoder(model, 40, fast=fast)
    assert decoder.fast == fast
    for a, b in zip(_lean_steps(decoder, ref["tokens"], 10), _hf_steps(model, ref["tokens"], 10)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
    # A chunk of several tokens after cached ones (the masked path) gives the same last logits.
    decoder.reset()
    decoder(ref["tokens"][:, :4])
    torch.testing.assert_close(decoder(ref["tokens"][:, 4:10]), _hf_steps(model, ref["tokens"][:, :10], 10)[0],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lean_loop_half_precision_model_close_to_hf(dtype):
    # The C layer ops round where HF's ops round, but sum in another order and keep the attention probabilities
    # in float32: close to the HF forward at the dtype's resolution, not equal.
    from cpu_ref.decoder import LeanDecoder

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(9)
    model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen3Config(**FAST), dtype=dtype)
    tokens = torch.randint(0, FAST["vocab_size"], (1, 24), generator=torch.Generator().manual_seed(4))
    decoder = LeanDecoder(model.eval(), 24)
    assert decoder.fast and decoder.k_cache.dtype == dtype
    for a, b in zip(_lean_steps(decoder, tokens, 8), _hf_steps(model, tokens, 8)):
        assert a.dtype == b.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=0.03 * float(b.abs().max()))


@pytest.mark.parametrize("fast", [True, False])
def test_lean_loop_packed_equals_integer_twin_every_step(fast, tmp_path):
    from cpu_ref.decoder import LeanDecoder
    from cpu_ref.reference import exact_reference

    transformers = pytest.importorskip("transformers")
    from bitdistill.convert import convert_to_bitnet

    torch.manual_seed(10)
    student = transformers.AutoModelForCausalLM.from_config(transformers.Qwen3Config(**FAST), dtype=torch.float32)
    convert_to_bitnet(student.eval(), subln=True, quantize=True, backend="torch")
    save_packed(student, tmp_path)
    packed, exact = load_packed(tmp_path), exact_reference(student)
    exact.set_output_embeddings(packed.get_output_embeddings())  # the same float head: logits compare exactly
    prompt = torch.randint(0, FAST["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(5))
    tokens = greedy_generate(packed, prompt, 16)["tokens"]
    assert torch.equal(tokens, greedy_generate(student, prompt, 16, loop="hf")["tokens"])
    dp, de = LeanDecoder(packed, 28, fast=fast), LeanDecoder(exact, 28, fast=fast)
    for a, b in zip(_lean_steps(dp, tokens, 12), _lean_steps(de, tokens, 12)):
        assert torch.equal(a, b)
    hf = _hf_steps(packed, tokens, 12)  # and the same model through the HF forward
    for a, b in zip(_lean_steps(LeanDecoder(packed, 28, fast=fast), tokens, 12), hf):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def test_lean_loop_direct_products_equal_module_calls(tmp_path):
    # The one-token path calls a float32 packed model's products straight through their prepared kernels: the same
    # bits as through the modules, at every step, SubLN products included.
    from cpu_ref.decoder import LeanDecoder

    transformers = pytest.importorskip("transformers")
    from bitdistill.convert import convert_to_bitnet

    torch.manual_seed(11)
    student = transformers.AutoModelForCausalLM.from_config(transformers.Qwen3Config(**FAST), dtype=torch.float32)
    convert_to_bitnet(student.eval(), subln=True, quantize=True, backend="torch")
    with torch.no_grad():
        for name, p in student.named_parameters():
            if name.endswith("subln.weight"):
                p.uniform_(0.5, 1.5)
    save_packed(student, tmp_path)
    packed = load_packed(tmp_path)
    direct, modules = LeanDecoder(packed, 30), LeanDecoder(packed, 30, direct=False)
    assert direct.direct and not modules.direct and modules.fast
    tokens = torch.randint(0, FAST["vocab_size"], (1, 30), generator=torch.Generator().manual_seed(6))
    for a, b in zip(_lean_steps(direct, tokens, 9), _lean_steps(modules, tokens, 9)):
        assert torch.equal(a, b)
    # Not a float32 packed model: module calls.
    assert not LeanDecoder(student, 8).direct


def test_lean_loop_unsupported_model_falls_back_to_hf():
    from cpu_ref.decoder import LeanDecoder, UnsupportedModelError, unsupported_reason

    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3Config(**FAST, layer_types=["sliding_attention", "full_attention"],
                                      use_sliding_window=True, sliding_window=4)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    assert "sliding" in unsupported_reason(model)
    prompt = torch.randint(0, FAST["vocab_size"], (1, 6))
    assert greedy_generate(model, prompt, 3)["loop"] == "hf"
    with pytest.raises(UnsupportedModelError, match="sliding"):
        greedy_generate(model, prompt, 3, loop="lean")
    with pytest.raises(ValueError, match="loop"):
        greedy_generate(model, prompt, 3, loop="fast")
    decoder = LeanDecoder(transformers.AutoModelForCausalLM.from_config(transformers.Qwen3Config(**FAST)).eval(), 4)
    with pytest.raises(ValueError, match="max_len"):
        decoder(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[1, T\]"):
        decoder(torch.zeros(2, 1, dtype=torch.long))


# ---------------------------------------------------------------- C layer ops vs torch

def _hf_rms(x, w, eps):
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_layer_ops_norm_and_swiglu_match_torch(dtype):
    from cpu_ref import layer_ops

    if not layer_ops.available():
        pytest.skip("the C layer ops are AVX-512 only")
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
        pytest.skip("the C layer ops are AVX-512 only")
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


def test_stacked_file_loads_as_views_and_equals_unstacked(student, tmp_path):
    # Version 2 files store q/k/v and gate/up stacked and load them as row views of one tensor (no copy); a file
    # written without stacking (version 1 layout) loads to the same model, stacked by a copy at load.
    from cpu_ref.fuse import projection_groups, stacked_rows

    save_packed(student, tmp_path / "stacked")
    save_packed(student, tmp_path / "flat", stack_projections=False)
    _, _, header = _header(tmp_path / "flat" / "cpu_ref.safetensors")
    assert "model.layers.0.self_attn.q_proj.qweight" in header and "stacked" not in header["__metadata__"]["linears"]
    a, b = load_packed(tmp_path / "stacked"), load_packed(tmp_path / "flat")
    for layer in list(a.model.layers) + list(b.model.layers):
        for parts in projection_groups(layer):
            assert stacked_rows([p.qweight for p in parts]) is not None
    prompt = torch.randint(0, TINY["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        assert torch.equal(a(input_ids=prompt).logits, b(input_ids=prompt).logits)
    assert torch.equal(greedy_generate(a, prompt, 8)["tokens"], greedy_generate(b, prompt, 8)["tokens"])


def test_integer_twin_float_path_equals_int32_path(student, monkeypatch):
    # The twin multiplies int8 x ternary codes as float32 (exact below 2^24 / 128 terms); the int32 path agrees.
    from cpu_ref import reference

    prompt = torch.randint(0, TINY["vocab_size"], (1, 7), generator=torch.Generator().manual_seed(8))
    with torch.inference_mode():
        fast = reference.exact_reference(student)(input_ids=prompt).logits
        monkeypatch.setattr(reference, "EXACT_F32_TERMS", 0)
        assert torch.equal(reference.exact_reference(student)(input_ids=prompt).logits, fast)

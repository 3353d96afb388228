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
    begin = header["model.layers.0.mlp.up_proj.qweight"]["data_offsets"][0]
    raw = bytearray(raw)
    pos = 8 + n + begin + 3
    raw[pos] = raw[pos] ^ 0b00000101  # still valid 2-bit codes: only the checksum sees it
    f.write_bytes(bytes(raw))
    with pytest.raises(PackingError, match="crc32"):
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

"""cpu_ref.model / fuse / runner: the packed model (same greedy tokens as the PyTorch student, bit for bit with
the exact integer twin), fused projections, the on-disk format (corrupt / truncated files -> clear errors), the CLI."""
import json
import pathlib
import struct

import pytest
import torch

from cpu_ref import PackingError, load_packed, pack_model, save_packed
from cpu_ref.runner import classify, greedy_generate
from cpu_ref_helpers import TINY, student, tiny_student  # noqa: F401 (student: a fixture)


# ---------------------------------------------------------------- packed model

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

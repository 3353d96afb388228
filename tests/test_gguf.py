"""GGUF export of a bitdistill student for llama.cpp (cpu_ref/gguf_export.py, gguf_reader.py, gguf_check.py).

Needs the `gguf` package (skipped without it); the llama.cpp comparison needs llama-cpp-python (skipped without).
"""
import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from cpu_ref.gguf_check import compare, llama_cpp_activation_blocks, llama_cpp_available, make_llama_student  # noqa: E402
from cpu_ref.gguf_export import GGUFExportError, export_gguf, representability_problems  # noqa: E402
from cpu_ref.gguf_reader import GGUFError, read_gguf  # noqa: E402

TERNARY = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
HF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
      "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
      "ffn_down": "mlp.down_proj"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    student = make_llama_student(root / "student", fp_dir=root / "teacher")
    return root, student, str(root / "teacher")


def _state(path):
    from safetensors.torch import load_file

    return load_file(f"{path}/model.safetensors")


@pytest.mark.parametrize("kind", ["tq2_0", "tq1_0"])
def test_round_trip_bit_for_bit(models, kind):
    from bitkernels.reference import ternarize_absmean

    root, student, _ = models
    out = root / f"s-{kind}.gguf"
    r = export_gguf(student, out, kind, embed="f32")
    assert r["fallbacks"] == [] and r["arch"] == "bitnet"
    f = read_gguf(out)
    assert f.metadata["general.architecture"] == "bitnet" and f.metadata["tokenizer.ggml.model"] == "gpt2"
    state = _state(student)
    for i in range(2):
        for g in TERNARY:
            name = f"blk.{i}.{g}.weight"
            assert f.tensors[name].type_name == kind.upper()
            codes, d = f.ternary_codes(name)
            want, scale = ternarize_absmean(state[f"model.layers.{i}.{HF[g]}.weight"].float())
            assert np.array_equal(codes, want.numpy())
            assert set(np.unique(d.astype(np.float32))) <= {0.0, 1.0}
            assert f.dequantize(f"blk.{i}.{g}.scale").tolist() == [scale.item()]  # float32, exactly
        sub = f.dequantize(f"blk.{i}.ffn_sub_norm.weight")
        assert np.array_equal(sub, state[f"model.layers.{i}.mlp.down_proj.subln.weight"].numpy())
    # our reader and gguf-py agree on every tensor, bit for bit
    for t in gguf.GGUFReader(str(out)).tensors:
        theirs = gguf.quants.dequantize(t.data, t.tensor_type)
        ours = f.dequantize(t.name)
        assert np.array_equal(ours, theirs.reshape(ours.shape)), t.name
    assert np.array_equal(f.dequantize("token_embd.weight"), state["model.embed_tokens.weight"].numpy())


def test_per_channel_scales_in_blocks(tmp_path):
    from bitkernels.reference import ternarize_absmean

    student = make_llama_student(tmp_path / "pc", num_hidden_layers=1, per_channel=True)
    f = read_gguf(export_gguf(student, tmp_path / "pc.gguf", "tq2_0")["out"])
    assert "blk.0.attn_q.scale" not in f.tensors
    w = _state(student)["model.layers.0.self_attn.q_proj.weight"].float()
    codes, scale = ternarize_absmean(w, per_channel=True)
    got, d = f.ternary_codes("blk.0.attn_q.weight")
    assert np.array_equal(got, codes.numpy())
    assert np.array_equal(d, np.repeat(scale.numpy().astype(np.float16)[:, None], d.shape[1], axis=1))


def test_rows_not_multiple_of_256(tmp_path):
    student = make_llama_student(tmp_path / "odd", num_hidden_layers=1, intermediate_size=320)
    with pytest.raises(GGUFExportError, match=r"blk\.0\.ffn_down\.weight: rows of 320 values"):
        export_gguf(student, tmp_path / "odd.gguf", "tq2_0", strict=True)
    assert list(tmp_path.glob("*.gguf*")) == [] and list(tmp_path.glob(".*tmp*")) == []
    r = export_gguf(student, tmp_path / "odd.gguf", "tq2_0")
    assert [n.split(":")[0] for n in r["fallbacks"]] == ["blk.0.ffn_down.weight"]
    f = read_gguf(tmp_path / "odd.gguf")
    assert f.tensors["blk.0.ffn_down.weight"].type_name == "Q8_0"
    assert f.tensors["blk.0.ffn_up.weight"].type_name == "TQ2_0"
    from bitkernels.reference import ternarize_absmean

    codes, _ = ternarize_absmean(_state(student)["model.layers.0.mlp.down_proj.weight"].float())
    assert np.array_equal(f.dequantize("blk.0.ffn_down.weight"), codes.numpy().astype(np.float32))


def test_reader_rejects_bad_files(models, tmp_path):
    root, student, _ = models
    good = tmp_path / "good.gguf"
    export_gguf(student, good, "tq2_0")
    data = good.read_bytes()
    cases = {"magic": b"GGUX" + data[4:], "version": data[:4] + (99).to_bytes(4, "little") + data[8:],
             "truncated-header": data[:200], "truncated-data": data[:len(data) - 1000]}
    for what, blob in cases.items():
        p = tmp_path / f"{what}.gguf"
        p.write_bytes(blob)
        with pytest.raises(GGUFError, match="not a GGUF|version 99|truncated|runs past the end"):
            read_gguf(p)
    # a TQ2_0 byte holding the unused code 3 is caught when decoded
    f = read_gguf(good)
    t = f.tensors["blk.0.attn_q.weight"]
    bad = bytearray(data)
    bad[t.offset] = 0xFF
    p = tmp_path / "code3.gguf"
    p.write_bytes(bytes(bad))
    with pytest.raises(GGUFError, match="value 3"):
        read_gguf(p).ternary_codes("blk.0.attn_q.weight")
    with pytest.raises(GGUFError, match="no tensor"):
        f.dequantize("nope")


def test_refuses_what_llama_cpp_cannot_represent(tmp_path):
    from transformers import AutoModelForCausalLM

    from bitdistill.convert import convert_to_bitnet
    from bitdistill.tiny import tiny_qwen3_config

    model = AutoModelForCausalLM.from_config(tiny_qwen3_config(64, hidden_size=256, intermediate_size=256))
    convert_to_bitnet(model, subln=True, backend="torch")
    model.save_pretrained(tmp_path / "q3")
    with pytest.raises(GGUFExportError, match="model_type 'qwen3'.*q/k norms"):
        export_gguf(tmp_path / "q3", tmp_path / "q3.gguf", "tq2_0")
    assert not (tmp_path / "q3.gguf").exists()

    from transformers import LlamaConfig

    c = LlamaConfig(hidden_size=256, num_attention_heads=4, tie_word_embeddings=False, hidden_act="gelu",
                    rope_scaling={"rope_type": "linear", "factor": 2.0}, rms_norm_eps=1e-5)
    problems = " | ".join(representability_problems(c, {"subln": False, "subln_eps": 1e-6}, ["x.bias"]))
    for why in ("without SubLN", "untied lm_head", "biases", "hidden_act 'gelu'", "rope_scaling"):
        assert why in problems
    rec = {"subln": True, "subln_eps": 1e-6, "quantize": True}
    assert "one epsilon" in " ".join(representability_problems(LlamaConfig(tie_word_embeddings=True,
                                                                           rms_norm_eps=1e-5), rec, []))


def test_failed_write_leaves_nothing(models, tmp_path, monkeypatch):
    import cpu_ref.gguf_export as ge

    _, student, _ = models

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ge, "add_vocab", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(student, tmp_path / "x.gguf", "tq1_0")
    assert list(tmp_path.iterdir()) == []


def test_cli_export_and_teacher(models, tmp_path, capsys):
    from cpu_ref.__main__ import main

    root, student, teacher = models
    assert main(["export-gguf", student, str(tmp_path / "s.gguf"), "--type", "tq1_0", "--embed", "f16"]) == 0
    assert read_gguf(tmp_path / "s.gguf").tensors["token_embd.weight"].type_name == "F16"
    with pytest.raises(SystemExit, match="not a student"):
        main(["export-gguf", teacher, str(tmp_path / "t.gguf"), "--type", "tq2_0"])
    assert main(["export-gguf", teacher, str(tmp_path / "t.gguf"), "--type", "q8_0"]) == 0
    t = read_gguf(tmp_path / "t.gguf")
    assert t.metadata["general.architecture"] == "llama" and t.tensors["blk.0.attn_q.weight"].type_name == "Q8_0"


def test_i2_s_round_trip_bit_for_bit(models):
    """bitnet.cpp's I2_S: the codes and the one fp32 scale inside each tensor, no .scale tensors, n/4 + 32 bytes."""
    from bitkernels.reference import ternarize_absmean

    root, student, _ = models
    out = root / "s-i2_s.gguf"
    r = export_gguf(student, out, "i2_s", embed="f32")
    assert r["fallbacks"] == [] and r["runtime"] == "bitnet.cpp"
    f = read_gguf(out)
    assert f.metadata["general.file_type"] == 40 and not [n for n in f.tensors if n.endswith(".scale")]
    state = _state(student)
    for i in range(2):
        for g in TERNARY:
            name = f"blk.{i}.{g}.weight"
            t = f.tensors[name]
            assert t.type_name == "I2_S" and t.nbytes == int(np.prod(t.shape)) // 4 + 32
            codes, scale = f.ternary_codes(name)
            want, s = ternarize_absmean(state[f"model.layers.{i}.{HF[g]}.weight"].float())
            assert np.array_equal(codes, want.numpy()) and scale.item() == s.item()  # float32, exactly
            assert np.array_equal(f.dequantize(name), (want.float() * s).numpy())
        sub = f.dequantize(f"blk.{i}.attn_sub_norm.weight")
        assert np.array_equal(sub, state[f"model.layers.{i}.self_attn.o_proj.subln.weight"].numpy())
    # (gguf-py's reader knows no type 36: it refuses the file, so only ours reads it back)
    assert np.array_equal(f.dequantize("token_embd.weight"), state["model.embed_tokens.weight"].numpy())


def test_i2_s_layout_by_hand():
    """ggml-bitnet-mad.cpp's quantize_i2_s: byte j of a 128-value block holds values j, 32+j, 64+j, 96+j at bits
    6, 4, 2, 0 as value + 1; then the scale as fp32 and 28 zero bytes."""
    from cpu_ref.gguf_export import i2_s_bytes

    codes = np.zeros((2, 128), np.int8)
    codes[0, [5, 37, 69, 101]] = [1, 0, -1, 1]        # block 0, byte 5: 2<<6 | 1<<4 | 0<<2 | 2
    codes[1, [0, 32, 64, 96]] = [-1, -1, -1, -1]      # block 1, byte 0: all zeros
    b = i2_s_bytes(codes, 0.25)
    assert b.size == 2 * 128 // 4 + 32
    expect = np.full(64, 0b01010101, np.uint8)         # every other value is 0 -> code 1 in each 2-bit field
    expect[5] = (2 << 6) | (1 << 4) | (0 << 2) | 2
    expect[32] = 0
    assert np.array_equal(b[:64], expect)
    assert b[64:68].view(np.float32).item() == 0.25 and not b[68:].any()


def test_i2_s_rows_not_multiple_of_128_and_per_channel(tmp_path):
    from bitkernels.reference import ternarize_absmean

    student = make_llama_student(tmp_path / "odd", num_hidden_layers=1, intermediate_size=320)
    with pytest.raises(GGUFExportError, match=r"blk\.0\.ffn_down\.weight: rows of 320 values.*128"):
        export_gguf(student, tmp_path / "odd.gguf", "i2_s", strict=True)
    assert list(tmp_path.glob("*.gguf*")) == [] and list(tmp_path.glob(".*tmp*")) == []
    r = export_gguf(student, tmp_path / "odd.gguf", "i2_s")
    assert [n.split(":")[0] for n in r["fallbacks"]] == ["blk.0.ffn_down.weight"]
    f = read_gguf(tmp_path / "odd.gguf")
    assert f.tensors["blk.0.ffn_down.weight"].type_name == "Q8_0" and "blk.0.ffn_down.scale" not in f.tensors
    assert f.tensors["blk.0.ffn_up.weight"].type_name == "I2_S"
    codes, s = ternarize_absmean(_state(student)["model.layers.0.mlp.down_proj.weight"].float())
    want = codes.numpy().astype(np.float32) * np.float32(np.float16(s.item()))  # the scale rounded to fp16
    assert np.array_equal(f.dequantize("blk.0.ffn_down.weight"), want)

    pc = make_llama_student(tmp_path / "pc", num_hidden_layers=1, per_channel=True)
    with pytest.raises(GGUFExportError, match="per-channel.*one scale a tensor"):
        export_gguf(pc, tmp_path / "pc.gguf", "i2_s")
    assert not (tmp_path / "pc.gguf").exists()


def test_reader_rejects_i2_s_code_3(models, tmp_path):
    root, student, _ = models
    good = tmp_path / "i2.gguf"
    export_gguf(student, good, "i2_s")
    t = read_gguf(good).tensors["blk.0.attn_q.weight"]
    bad = bytearray(good.read_bytes())
    bad[t.offset] = 0xFF
    p = tmp_path / "i2-code3.gguf"
    p.write_bytes(bytes(bad))
    with pytest.raises(GGUFError, match="I2_S holds the unused 2-bit value 3"):
        read_gguf(p).ternary_codes("blk.0.attn_q.weight")


def _bitnet_cpp_checkout():
    import os
    import pathlib

    d = os.environ.get("BITNET_CPP_DIR")
    if not d:
        return None, "BITNET_CPP_DIR (a built microsoft/BitNet checkout) is not set"
    if not (pathlib.Path(d) / "build" / "3rdparty" / "llama.cpp" / "src" / "libllama.so").is_file():
        return None, f"BITNET_CPP_DIR={d} holds no build/3rdparty/llama.cpp/src/libllama.so"
    return d, ""


@pytest.mark.skipif(_bitnet_cpp_checkout()[0] is None, reason=_bitnet_cpp_checkout()[1])
def test_bitnet_cpp_runs_i2_s_like_the_student(models):
    root, student, _ = models
    out = root / "cmp-i2_s.gguf"
    export_gguf(student, out, "i2_s", embed="f32")
    r = compare(student, out, n_tokens=32, n_threads=2, bitnet_cpp=_bitnet_cpp_checkout()[0])
    assert r["runtime"] == "bitnet.cpp" and r["tokenization_equal"]
    assert r["mean_greedy_equal_frac"] == 1.0 and r["mean_argmax_agree"] == 1.0, json.dumps(r)
    # per-token int8 activations as in the student: closer than TQ2_0's per-256 blocks (< 0.015 there)
    assert r["max_logits_rel_err"] < 0.01, json.dumps(r)


needs_llama = pytest.mark.skipif(not llama_cpp_available()[0], reason=llama_cpp_available()[1])


@needs_llama
@pytest.mark.parametrize("kind", ["tq2_0", "tq1_0"])
def test_llama_cpp_matches_student(models, kind):
    root, student, _ = models
    out = root / f"cmp-{kind}.gguf"
    export_gguf(student, out, kind, embed="f32")
    r = compare(student, out, n_tokens=32, n_threads=2)
    # only the activation quantization differs (per token in the student, per 256-block in llama.cpp)
    assert r["tokenization_equal"]
    assert r["mean_argmax_agree"] >= 0.9, json.dumps(r)
    # a wrong mapping shows: attn_sub_norm left at 1 gives 2.9e-2 here; the right file 6e-3
    assert r["max_logits_rel_err"] < 0.015, json.dumps(r)


@needs_llama
def test_llama_cpp_teacher_matches_hf(models):
    """The FP teacher as llama-arch f32: q/k permutation, RoPE and metadata right (logits to float rounding)."""
    from transformers import AutoModelForCausalLM

    from cpu_ref.gguf_check import llama_logits, load_llama

    root, _, teacher = models
    out = root / "teacher-f32.gguf"
    export_gguf(teacher, out, "f32")
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    ids = list(range(3, 40))
    with torch.inference_mode():
        ref = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    got = llama_logits(load_llama(out, n_ctx=64, n_threads=2), ids)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 5e-4  # 1.2e-5 measured; unpermuted q/k: 2.4e-3
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.95


def test_placeholder_vocab_for_token_id_benchmarks(models, tmp_path):
    root, student, _ = models
    r = export_gguf(student, tmp_path / "p.gguf", "tq2_0", vocab="placeholder")
    f = read_gguf(r["out"])
    tokens = f.metadata["tokenizer.ggml.tokens"]
    assert len(tokens) == f.tensors["token_embd.weight"].shape[0] and len(set(tokens)) == len(tokens)
    assert tokens[10] == "Ċ" and tokens[32] == "Ġ"  # the byte-level alphabet first
    if llama_cpp_available()[0]:
        from cpu_ref.gguf_check import llama_logits, load_llama

        assert llama_logits(load_llama(r["out"], n_ctx=32, n_threads=1), [1, 2, 3]).shape == (3, len(tokens))


@needs_llama
def test_llama_cpp_classification_equals_pytorch(models, tmp_path):
    """classify-gguf scores as bitdistill.evaluate does: the f32 teacher gives the same accuracy and macro-F1."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bitdistill.data import TaskSpec
    from bitdistill.evaluate import evaluate
    from cpu_ref.gguf_check import classification_accuracy

    root, _, teacher = models
    out = root / "teacher-cls-f32.gguf"
    export_gguf(teacher, out, "f32")
    spec = TaskSpec(type="classification", train_file="unused", eval_file="unused", text_column="text",
                    label_column="label", label_words=["bad", "okay", "great"],
                    template="Tweet: {text}\nSentiment:", max_length=64)
    words = "the movie was great in the morning my friend said book park last week".split()
    g = torch.Generator().manual_seed(0)
    rows = [{"text": " ".join(words[int(i)] for i in torch.randint(len(words), (int(n),), generator=g)),
             "label": int(lab)}
            for n, lab in zip(torch.randint(2, 12, (24,), generator=g), torch.randint(3, (24,), generator=g))]
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    ref = evaluate(model, AutoTokenizer.from_pretrained(teacher), spec, rows, batch_size=8)
    got = classification_accuracy(out, teacher, spec, rows, n_threads=2)
    assert got["n"] == ref["n"] == 24
    assert got["accuracy"] == pytest.approx(ref["accuracy"]) and got["macro_f1"] == pytest.approx(ref["macro_f1"])
    assert 0 < ref["accuracy"] < 100  # a constant predictor would hide a scoring bug


@needs_llama
def test_classify_gguf_bad_input_is_a_clear_error(models, tmp_path):
    from cpu_ref.__main__ import main

    root, student, _ = models
    with pytest.raises(SystemExit, match="does not exist .write it with export-gguf"):
        main(["classify-gguf", str(tmp_path / "none.gguf"), student, "--config", "bitdistill/configs/tiny.yaml"])
    (tmp_path / "x.gguf").write_bytes(b"")
    with pytest.raises(SystemExit, match="classify-gguf: config file 'nope.yaml' does not exist"):
        main(["classify-gguf", str(tmp_path / "x.gguf"), student, "--config", "nope.yaml"])


@pytest.mark.parametrize("in_features,block", [(512, 256), (96, 32)])
def test_llama_cpp_activation_blocks_quantize_per_block_and_restore(in_features, block):
    from bitkernels import BitLinear
    from bitkernels.reference import ternarize_absmean

    torch.manual_seed(0)
    m = BitLinear(in_features, 8, bias=True, subln=True, backend="torch")
    x = torch.randn(3, in_features) * torch.linspace(0.1, 4, in_features)   # blocks of very different ranges
    per_token = m(x)
    h = m.subln(x).reshape(3, -1, block)
    d = h.abs().amax(-1, keepdim=True) / 127
    d = d.half().float() if block == 32 else d
    codes, scale = ternarize_absmean(m.weight)
    want = (torch.round(h / d) * d).reshape(3, -1) @ (codes.float() * scale).T + m.bias
    with llama_cpp_activation_blocks(m):
        got = m(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - per_token).abs().max() > 1e-3   # the blocks are not per-token quantization
    torch.testing.assert_close(m(x), per_token, rtol=0, atol=0)   # restored on exit


def test_activation_blocks_as_bitnet_cpp_runs_i2_s():
    """bitnet.cpp's I2_S rows (multiples of 128) keep per-token int8; the others (its Q8_0 rows) go in blocks of 32."""
    from bitkernels import BitLinear

    torch.manual_seed(0)
    i2, q8 = (BitLinear(k, 8, bias=False, subln=True, backend="torch") for k in (512, 96))  # 512: two Q8_K blocks
    model = torch.nn.ModuleList([i2, q8])
    x2, x8 = torch.randn(3, 512) * torch.linspace(0.1, 4, 512), torch.randn(3, 96) * torch.linspace(0.1, 4, 96)
    ref2, ref8 = i2(x2), q8(x8)
    with llama_cpp_activation_blocks(model, i2_s=True):
        torch.testing.assert_close(i2(x2), ref2, rtol=0, atol=0)
        assert (q8(x8) - ref8).abs().max() > 1e-3
    with llama_cpp_activation_blocks(model):
        assert (i2(x2) - ref2).abs().max() > 1e-3

"""Conversion FP -> BitNet student: structure, initial weights, FP equivalence with quantization off, save/load."""
import pytest
import torch
import torch.nn as nn

pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config  # noqa: E402

from bitdistill.convert import (  # noqa: E402
    UnsupportedModelError,
    bitlinear_names,
    convert_to_bitnet,
    load_student,
)
from bitkernels import BitLinear  # noqa: E402

BLOCK_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj")


def qwen3(tie=True):
    return Qwen3Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=tie)


def llama():
    return LlamaConfig(vocab_size=80, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                       num_attention_heads=3, num_key_value_heads=1, tie_word_embeddings=False)


def fresh(config_fn, seed=0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config_fn()).eval()


@pytest.mark.parametrize("config_fn", [qwen3, llama], ids=["qwen3", "llama"])
def test_quantization_off_without_subln_matches_fp_logits(config_fn):
    fp, student = fresh(config_fn), fresh(config_fn)
    convert_to_bitnet(student, subln=False, quantize=False)
    ids = torch.randint(0, fp.config.vocab_size, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        torch.testing.assert_close(student(ids, attention_mask=mask).logits, fp(ids, attention_mask=mask).logits,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("config_fn", [qwen3, llama], ids=["qwen3", "llama"])
def test_structure_and_initial_weights(config_fn):
    fp, student = fresh(config_fn), fresh(config_fn)
    convert_to_bitnet(student)
    n_layers = fp.config.num_hidden_layers
    expected = sorted(f"model.layers.{i}.{name}" for i in range(n_layers) for name in BLOCK_LINEARS)
    assert sorted(bitlinear_names(student)) == expected
    fp_state, st_state = fp.state_dict(), student.state_dict()
    for name in expected:
        module = student.get_submodule(name)
        has_subln = name.endswith(("o_proj", "down_proj"))
        assert module.quantize and (module.subln is not None) == has_subln, name
        torch.testing.assert_close(st_state[f"{name}.weight"], fp_state[f"{name}.weight"], rtol=0, atol=0)
        if has_subln:
            assert torch.equal(st_state[f"{name}.subln.weight"], torch.ones(module.in_features))
            assert module.subln.eps == fp.config.rms_norm_eps
    # embeddings, norms and lm_head stay full precision and untouched
    assert type(student.lm_head) is nn.Linear and type(student.model.embed_tokens) is nn.Embedding
    assert set(st_state) - set(fp_state) == {f"model.layers.{i}.{p}.subln.weight" for i in range(n_layers)
                                             for p in ("self_attn.o_proj", "mlp.down_proj")}
    for key in fp_state:
        torch.testing.assert_close(st_state[key], fp_state[key], rtol=0, atol=0)
    assert student.config.bitdistill["subln"] is True and student.config.bitdistill["quantize"] is True
    # quantization on changes the function (ternary weights, int8 activations)
    ids = torch.randint(0, fp.config.vocab_size, (1, 6))
    with torch.no_grad():
        assert not torch.allclose(student(ids).logits, fp(ids).logits)


def test_converted_layers_share_fp_parameters():
    model = fresh(qwen3)
    q = model.model.layers[0].self_attn.q_proj.weight
    convert_to_bitnet(model)
    assert model.model.layers[0].self_attn.q_proj.weight is q
    assert isinstance(model.model.layers[0].self_attn.q_proj, BitLinear)


@pytest.mark.parametrize("tie", [True, False])
def test_save_load_round_trip_is_exact(tmp_path, tie):
    student = convert_to_bitnet(fresh(lambda: qwen3(tie)), per_channel=True)
    with torch.no_grad():  # make every SubLN weight non-trivial so a dropped key would show
        for name, p in student.named_parameters():
            if "subln" in name:
                p.uniform_(0.5, 1.5)
    student.save_pretrained(tmp_path)
    loaded = load_student(tmp_path)
    assert loaded.config.bitdistill == student.config.bitdistill
    assert sorted(bitlinear_names(loaded)) == sorted(bitlinear_names(student))
    assert all(loaded.get_submodule(n).per_channel for n in bitlinear_names(loaded))
    a, b = student.state_dict(), loaded.state_dict()
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tie
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, student.eval()(ids).logits, rtol=0, atol=0)


def test_unsupported_model_names_what_it_expected():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4))])

    with pytest.raises(UnsupportedModelError, match=r"self_attn.*q_proj.*down_proj"):
        convert_to_bitnet(Odd())


def test_converting_twice_is_refused():
    model = convert_to_bitnet(fresh(qwen3))
    with pytest.raises(ValueError, match="already has BitLinear"):
        convert_to_bitnet(model)


def test_load_student_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_student(tmp_path / "nope")


def test_load_student_refuses_mismatched_checkpoint(tmp_path):
    student = convert_to_bitnet(fresh(qwen3))
    student.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "model.safetensors"))
    del state["model.layers.0.self_attn.o_proj.subln.weight"]
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="subln.weight"):
        load_student(tmp_path)

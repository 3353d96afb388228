"""cpu_ref.decoder: the lean decode loop against the HF forward (fp32, half precision, packed) and its fallback."""

import pytest
import torch

from cpu_ref import load_packed, save_packed
from cpu_ref.runner import greedy_generate
from cpu_ref_helpers import TINY


# ---------------------------------------------------------------- lean decode loop vs the HF forward

FAST = dict(TINY, intermediate_size=192, head_dim=32)  # sizes the C layer ops take (multiples of 16, head_dim 32)


def _vectorized() -> bool:
    """The C layer ops are there (AVX-512 or AVX2 build): the decoder's fast / direct paths run; else it keeps torch ops."""
    from cpu_ref import layer_ops

    return layer_ops.available()


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
    assert decoder.fast == (fast and _vectorized())  # the C layer ops need AVX-512 or AVX2; else torch ops
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
    assert decoder.fast == _vectorized() and decoder.k_cache.dtype == dtype
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
    assert direct.direct == _vectorized() and not modules.direct and modules.fast == _vectorized()
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

"""Shared by the tests/test_cpu_ref_*.py modules: random ternary codes and a tiny Qwen3 student."""
import pytest
import torch

K_SIZES = [1, 2, 3, 4, 5, 6, 7, 63, 64, 65, 255, 256, 257, 300, 513, 1029]


def random_codes(n, k, seed=0, p_zero=0.4):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    return codes * (torch.rand(n, k, generator=g) > p_zero).to(torch.int8)



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


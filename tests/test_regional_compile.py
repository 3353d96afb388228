"""Regional compile of the decoder layers (bitdistill.regional_compile): same numbers, same module tree."""
import pytest
import torch

pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, Qwen3Config  # noqa: E402

from bitdistill.convert import convert_to_bitnet, find_decoder_layers  # noqa: E402
from bitdistill.regional_compile import check_compile_mode, compile_decoder_layers  # noqa: E402


def tiny_student(seed=0):
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    return convert_to_bitnet(AutoModelForCausalLM.from_config(cfg), backend="torch")


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_layers_give_the_eager_numbers_and_keep_the_module_tree():
    eager, compiled = tiny_student(), tiny_student()
    keys = list(compiled.state_dict())
    done = compile_decoder_layers(compiled, "default", skip=(-1,), backend="aot_eager")
    assert done == [0, 1]  # the last layer (the distilled one by default) stays eager
    layers = find_decoder_layers(compiled)[1]
    assert all(layers[i]._compiled_call_impl is not None for i in done)
    assert layers[2]._compiled_call_impl is None
    assert list(compiled.state_dict()) == keys  # checkpoints and save_pretrained see the same names
    ids = torch.randint(0, 96, (2, 11))
    logits_e, grads_e = loss_and_grads(eager, ids)
    logits_c, grads_c = loss_and_grads(compiled, ids)
    torch.testing.assert_close(logits_c, logits_e, rtol=1e-5, atol=1e-5)
    assert grads_c.keys() == grads_e.keys()
    for n in grads_e:
        torch.testing.assert_close(grads_c[n], grads_e[n], rtol=1e-4, atol=1e-6, msg=n)


def test_no_mode_compiles_nothing_and_bad_modes_are_named():
    model = tiny_student()
    assert compile_decoder_layers(model, None) == []
    assert check_compile_mode("off") is None
    with pytest.raises(ValueError, match="reduce-overhead"):
        check_compile_mode("fast")

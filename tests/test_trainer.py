"""bitdistill.trainer on a tiny Qwen3 (CPU, seconds): deadline stop + resume, TrainArgs validation.

``tiny_run`` is shared with tests/test_faults.py (which also runs it in a subprocess)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("transformers")

from bitdistill.trainer import TrainArgs, train  # noqa: E402

VOCAB = 64


def tiny_examples(n: int = 24) -> list[dict]:
    rng = random.Random(0)
    out = []
    for _ in range(n):
        ids = [rng.randrange(2, VOCAB) for _ in range(rng.randrange(4, 12))]
        out.append({"input_ids": ids, "labels": ids})
    return out


def lm_loss(model, batch: dict) -> dict:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                                             ignore_index=-100)
    return {"loss": loss, "ce": loss.detach()}


def tiny_model():
    from transformers import Qwen3ForCausalLM

    from bitdistill.tiny import tiny_qwen3_config

    torch.manual_seed(0)
    # dropout on: the losses depend on the torch RNG, so a resume must restore it exactly
    cfg = tiny_qwen3_config(VOCAB, hidden_size=16, num_hidden_layers=1, intermediate_size=32, attention_dropout=0.2,
                            max_position_embeddings=32)
    return Qwen3ForCausalLM(cfg)


def tiny_run(out: Path, resume: bool = False, **overrides) -> dict:
    """Train the tiny model under ``out`` (stage "tiny"); returns train()'s result."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    kw = dict(lr=1e-2, batch_size=4, max_steps=6, warmup_ratio=0.2, log_every=1, checkpoint_every=2,
              keep_checkpoints=3)
    kw.update(overrides)
    accelerator = Accelerator(cpu=True)
    return train(accelerator, tiny_model(), tiny_examples(), lm_loss, TrainArgs(**kw), Path(out), "tiny",
                 pad_id=0, seed=1, resume=resume)


def losses(history: list[dict]) -> list[tuple]:
    return [(h["step"], h["loss"], h["lr"], h.get("grad_norm")) for h in history]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run's history (per-step loss, lr, grad norm)."""
    return losses(tiny_run(tmp_path_factory.mktemp("straight"))["history"])


def test_deadline_stops_checkpointed_and_resume_is_bit_exact(tmp_path, monkeypatch, straight):
    from types import SimpleNamespace

    import bitdistill.trainer as trainer

    clock = iter(range(1000, 2000))   # the trainer's clock only: one tick per check, past 1002 after step 3
    monkeypatch.setattr(trainer, "time", SimpleNamespace(time=lambda: next(clock)))
    run = tiny_run(tmp_path, deadline=1002)
    assert run["stopped_early"] and run["steps"] == 3 and len(run["history"]) == 3
    assert (tmp_path / "checkpoints" / "checkpoint-3").is_dir()
    monkeypatch.undo()
    resumed = tiny_run(tmp_path, resume=True)
    assert not resumed["stopped_early"] and resumed["steps"] == 6
    assert losses(resumed["history"]) == straight


def test_deadline_in_the_future_changes_nothing(tmp_path, straight):
    import time

    run = tiny_run(tmp_path, deadline=time.time() + 3600)
    assert not run["stopped_early"] and losses(run["history"]) == straight


def test_deadline_already_past_stops_after_one_step(tmp_path):
    run = tiny_run(tmp_path, deadline=0.0)
    assert run["stopped_early"] and run["steps"] == 1
    assert json.loads((tmp_path / "checkpoints" / "checkpoint-1" / "trainer_state.json").read_text())["step"] == 1


@pytest.mark.parametrize("key,value,allowed", [
    ("max_steps", -5, ">= 1 or null, got -5"), ("max_steps", 0, ">= 1 or null"),
    ("lr", 0.0, "a finite number > 0"), ("lr", float("inf"), "a finite number > 0"), ("lr", "x", "> 0, got 'x'"),
    ("batch_size", 0, "an integer >= 1"), ("grad_accum", 0, "an integer >= 1"), ("epochs", 0, "> 0"),
    ("warmup_ratio", 1.0, r"in \[0, 1\)"), ("warmup_ratio", -0.1, r"in \[0, 1\)"), ("weight_decay", -1, ">= 0"),
    ("max_grad_norm", -1, ">= 0"), ("checkpoint_every", -1, "an integer >= 0"), ("keep_checkpoints", 0, ">= 1"),
    ("log_every", 0, ">= 1"), ("eval_batch_size", 0, ">= 1"), ("stop_after_steps", 0, ">= 1 or null"),
    ("pad_to_multiple_of", 0, ">= 1"), ("batch_size", 2.5, "an integer"), ("deadline", float("nan"), "time.time"),
    ("scheduler", "plateau", "one of linear, cosine"),
])
def test_bad_train_args_name_the_key_and_the_range(key, value, allowed):
    with pytest.raises(ValueError, match=rf"^train\.{key} must be.*{allowed}"):
        TrainArgs(**{key: value})


def test_good_train_args_pass():
    TrainArgs(max_steps=None, stop_after_steps=None, checkpoint_every=0, max_grad_norm=0, warmup_ratio=0,
              deadline=1e9, scheduler="linear")

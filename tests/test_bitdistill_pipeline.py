"""The pipeline end to end on the tiny generated task (CPU): all stages, summary, resume equality, bad inputs."""
import json

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("transformers")

from bitdistill import train as T  # noqa: E402
from bitdistill.data import DataError  # noqa: E402
from bitdistill.trainer import NonFiniteLossError, TrainArgs, train  # noqa: E402

SMALL = ["--set", "tiny_data_sizes={n_train: 96, n_eval: 24, n_corpus: 120}", "--set", "train.batch_size=4",
         "--set", "train.eval_batch_size=12", "--set", "pretrain.token_budget=2048", "--set", "train.log_every=1"]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def run(out, *extra):
    return T.main(["--output_dir", str(out), *SMALL, *extra])


def test_all_stages_end_to_end_with_summary(tmp_path, capsys):
    results = run(tmp_path, "--set", "train.max_steps=3", "--backend", "torch")
    for stage in T.STAGES:
        assert results[stage]["steps"] == 3
        assert (tmp_path / stage / "model" / "model.safetensors").is_file()
        assert (tmp_path / stage / "result.json").is_file()
    for stage in ("sft", "bitnet-sft", "distill"):
        assert 0.0 <= results[stage]["metrics"]["accuracy"] <= 100.0 and results[stage]["metrics"]["n"] == 24
    assert set(results["distill"]["final"]) >= {"loss", "ce", "ld", "ad", "tokens"}
    printed = capsys.readouterr().out
    for row in ("FP-SFT", "BitNet-SFT", "BitDistill"):
        assert row in printed
    assert (tmp_path / "summary.json").is_file() and (tmp_path / "summary.png").stat().st_size > 0
    assert list((tmp_path / "logs").rglob("events.out.tfevents*")), "tensorboard events were not written"
    # the saved distilled student reloads as a BitNet model
    from bitdistill.convert import bitlinear_names, load_student

    assert bitlinear_names(load_student(tmp_path / "distill" / "model"))


def test_summarization_task_generates_and_scores_rouge(tmp_path):
    results = run(tmp_path, "--stages", "sft", "--set", "train.max_steps=2", "--set", "task.type=summarization",
                  "--set", "task.train_file=tiny:lead_train", "--set", "task.eval_file=tiny:lead_eval",
                  "--set", "task.text_column=article", "--set", "task.template='Article: {text}\nSummary:'",
                  "--set", "task.max_target_length=8", "--set", "task.max_eval_examples=6")
    metrics = results["sft"]["metrics"]
    assert set(metrics) == {"rouge1", "rouge2", "rougeL", "n"} and metrics["n"] == 6


def test_resume_continues_to_the_same_numbers(tmp_path):
    common = ["--stages", "sft,pretrain,distill", "--set", "train.max_steps=2", "--set", "distill.max_steps=6",
              "--set", "distill.checkpoint_every=3", "--backend", "torch"]
    straight = run(tmp_path / "a", *common)
    partial = run(tmp_path / "b", *common, "--set", "distill.stop_after_steps=3")
    assert partial["distill"]["stopped_early"] and partial["distill"]["steps"] == 3
    assert (tmp_path / "b" / "distill" / "checkpoints" / "checkpoint-3").is_dir()
    resumed = run(tmp_path / "b", *common, "--resume")
    a = json.loads((tmp_path / "a" / "distill" / "history.json").read_text())
    b = json.loads((tmp_path / "b" / "distill" / "history.json").read_text())
    assert [h["step"] for h in b] == [1, 2, 3, 4, 5, 6]
    for ha, hb in zip(a, b):
        for key in ("loss", "ce", "ld", "ad", "lr"):
            assert ha[key] == hb[key], (ha["step"], key)
    assert resumed["distill"]["metrics"] == straight["distill"]["metrics"]


def test_missing_column_is_named(tmp_path):
    with pytest.raises(DataError, match=r"missing column\(s\) \['review'\].*'label', 'text'"):
        run(tmp_path, "--stages", "sft", "--set", "task.text_column=review")


def test_label_out_of_range(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the movie was great.", "label": 1}\n{"text": "it was awful.", "label": 5}\n')
    with pytest.raises(DataError, match=r"row 1: label 5 is out of range \[0, 2\)"):
        run(tmp_path / "out", "--stages", "sft", "--set", f"task.train_file={bad}")


def test_model_path_that_does_not_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run(tmp_path, "--stages", "sft", "--model", str(tmp_path / "no" / "model"))


def test_teacher_student_vocab_mismatch(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen3Config

    run(tmp_path, "--stages", "pretrain", "--set", "train.max_steps=1")
    other = AutoModelForCausalLM.from_config(Qwen3Config(vocab_size=50, hidden_size=64, intermediate_size=64,
                                                         num_hidden_layers=1, num_attention_heads=4,
                                                         num_key_value_heads=2, head_dim=16))
    other.save_pretrained(tmp_path / "other_teacher")
    with pytest.raises(ValueError, match="teacher vocabulary .* differs"):
        run(tmp_path, "--stages", "distill", "--set", f"distill.teacher={tmp_path / 'other_teacher'}")
    assert not (tmp_path / "distill" / "model").exists()


def test_distill_without_its_inputs_names_the_stage_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the 'pretrain' stage first"):
        run(tmp_path, "--stages", "distill")


def test_nan_loss_stops_with_step_and_last_checkpoint(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 1)
    examples = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]} for _ in range(8)]
    calls = {"n": 0}

    def loss_fn(m, batch):
        calls["n"] += 1
        loss = m(batch["input_ids"].float()[:, :1].repeat(1, 4)).pow(2).mean()
        return {"loss": loss * float("nan") if calls["n"] == 3 else loss}

    args = TrainArgs(lr=1e-3, batch_size=2, max_steps=5, checkpoint_every=2, log_every=1)
    with pytest.raises(NonFiniteLossError, match=r"at step 3 .*checkpoint-2"):
        train(accelerator, model, examples, loss_fn, args, tmp_path, "sft", pad_id=0, seed=0, resume=False)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["checkpoint-2"]   # nothing partial, nothing after the failure
    assert json.loads((tmp_path / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())["step"] == 2


def test_bad_override_and_unknown_stage(tmp_path):
    with pytest.raises(ValueError, match="unknown stage"):
        run(tmp_path, "--stages", "sft,finetune")
    with pytest.raises(ValueError, match="must be a number"):
        run(tmp_path, "--stages", "sft", "--set", "train.lr=fast")
    with pytest.raises(ValueError, match="compile must be null or one of"):
        run(tmp_path, "--stages", "sft", "--set", "train.compile=fast")


def test_pretrain_reads_the_extra_corpus_files_after_the_main_one(tmp_path, monkeypatch):
    extra = tmp_path / "extra.jsonl"
    extra.write_text("\n".join(json.dumps({"text": f"extra paragraph {i}."}) for i in range(3)) + "\n")
    seen = []

    def recording_pack(tokenizer, texts, block_size, token_budget):
        seen.extend(texts)
        return T_pack(tokenizer, seen, block_size, token_budget)

    T_pack = T.pack_corpus
    monkeypatch.setattr(T, "pack_corpus", recording_pack)
    run(tmp_path / "a", "--stages", "pretrain", "--set", "train.max_steps=1",
        "--set", f"pretrain.corpus.files=[{extra}]")
    assert seen[-3:] == [f"extra paragraph {i}." for i in range(3)] and len(seen) > 3
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        run(tmp_path / "b", "--stages", "pretrain", "--set", f"pretrain.corpus.files=[{tmp_path / 'missing.jsonl'}]")

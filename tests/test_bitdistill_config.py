"""bitdistill.config: every shipped config parses into the typed tree; unknown keys, wrong types and bad choices are
errors naming the key (and the known keys) before anything is loaded or written."""
from pathlib import Path

import pytest

from bitdistill import train
from bitdistill.config import DEFAULT_CONFIG, PipelineConfig, fill_tiny_paths, load_config, parse_config, read_config
from bitdistill.losses import DistillConfig
from bitdistill.trainer import TrainArgs

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "bitdistill" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_parses(path):
    cfg = parse_config(load_config(path))
    assert isinstance(cfg, PipelineConfig) and isinstance(cfg.distill.loss, DistillConfig)
    for stage in cfg.stages:
        assert isinstance(cfg.train_args(stage), TrainArgs)


def test_stage_sections_override_train_and_numbers_are_cast():
    cfg = parse_config(read_config(DEFAULT_CONFIG, ["train.lr=1e-3", "distill.lr='2e-3'", "pretrain.batch_size=3",
                                                    "distill.gamma_ad='1e4'", "train.compile=false"]))
    assert cfg.train_args("sft").lr == cfg.train_args("bitnet-sft").lr
    assert cfg.train_args("distill").lr == 2e-3 and isinstance(cfg.train_args("distill").lr, float)
    assert cfg.train_args("pretrain").batch_size == 3 and cfg.train_args("distill").batch_size != 3
    assert cfg.distill.loss.gamma_ad == 1e4 and cfg.train_args("sft").compile is None
    # as recorded (config.resolved.yaml, results files): Python's "3e-05" is a float, a quoted one a string
    raw = read_config(DEFAULT_CONFIG, ["sft.lr=3e-05", "task.template='1e-5'"])
    assert raw["sft"]["lr"] == 3e-05 and isinstance(raw["sft"]["lr"], float) and raw["task"]["template"] == "1e-5"


@pytest.mark.parametrize("override,match", [
    ("distill.gamma=1e4", r"unknown distill key\(s\) \['gamma'\]; known: .*'gamma_ad'"),
    ("outptu_dir=x", r"unknown the config's top level key\(s\) \['outptu_dir'\]"),
    ("convert.sublm=true", r"unknown convert key\(s\) \['sublm'\]"),
    ("task.max_len=3", r"unknown task key\(s\) \['max_len'\]"),
    ("pretrain.corpus.fle=a.jsonl", r"unknown pretrain.corpus key\(s\) \['fle'\]"),
    ("train.lrr=1", r"unknown train key\(s\) \['lrr'\]"),
    ("sft.batch=4", r"unknown sft key\(s\) \['batch'\]"),
    ("train.batch_size=abc", r"train.batch_size must be an integer"),
    ("train.batch_size=2.5", r"train.batch_size must be an integer"),
    ("convert.subln=maybe", r"convert.subln must be true or false"),
    ("convert.layout=every", r"convert.layout must be one of"),
    ("distill.teacher_dtype=int8", r"distill.teacher_dtype must be one of"),
    ("distill.kd_positions=some", r"distill.kd_positions must be one of"),
    ("distill.lr=-1", r"distill.lr must be a finite number > 0"),
    ("train.lr=0", r"train.lr must be a finite number > 0"),
    ("train.compile=fast", r"compile must be null or one of"),
    ("backend=cuda", r"backend must be one of"),
    ("mixed_precision=fp8", r"mixed_precision must be one of"),
    ("stages=[sft, polish]", r"unknown stage\(s\) \['polish'\]"),
    ("seed=abc", r"seed must be an integer"),
    ("pretrain.block_size=1", r"pretrain.block_size must be an integer >= 2"),
    ("task=3", r"task must be a mapping"),
])
def test_bad_settings_name_the_key(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(DEFAULT_CONFIG, [override])


def test_tiny_paths_are_filled_and_unknown_ones_refused():
    cfg = parse_config(read_config(DEFAULT_CONFIG))
    files = {"sentiment_train": "/d/train.jsonl", "sentiment_eval": "/d/eval.jsonl", "corpus": "/d/corpus.jsonl"}
    filled = fill_tiny_paths(cfg, files)
    assert (filled.task.train_file, filled.task.eval_file, filled.pretrain.corpus.file) == (
        "/d/train.jsonl", "/d/eval.jsonl", "/d/corpus.jsonl")
    assert cfg.task.train_file == "tiny:sentiment_train"  # the parsed config itself is unchanged
    with pytest.raises(ValueError, match="names no generated file"):
        fill_tiny_paths(cfg, {"corpus": "/d/corpus.jsonl"})


def test_pipeline_refuses_a_bad_key_before_writing_anything(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="unknown distill key"):
        train.main(["--output_dir", str(out), "--set", "distill.gama_ad=1"])
    assert not out.exists()

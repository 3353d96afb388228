"""The pipeline's configuration: a YAML file plus ``--set key.path=value`` overrides, checked once into a tree of
dataclasses (``PipelineConfig``). Every key, type and choice is checked here, before any model is loaded, so a typo
(``distill.gamma=1e4``) is an error naming the known keys rather than a setting that is silently ignored.

Sections and what they hold:
  model        name_or_path (hub id or local dir; null: the tiny generated model), tiny (its sizes)
  convert      Stage 1: subln, layout, per_channel, subln_eps (bitdistill.convert.convert_to_bitnet)
  task         bitdistill.data.TaskSpec
  train        bitdistill.trainer.TrainArgs shared by every stage
  sft, bitnet_sft, pretrain, distill
               per-stage TrainArgs overrides (lr, batch_size, ...); pretrain adds block_size, token_budget and corpus;
               distill adds bitdistill.losses.DistillConfig's fields and student, teacher, teacher_dtype
"""
from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from bitdistill.convert import SUBLN_LAYOUTS
from bitdistill.data import TaskSpec
from bitdistill.losses import DistillConfig
from bitdistill.regional_compile import check_compile_mode
from bitdistill.summary import STAGES
from bitdistill.trainer import TrainArgs

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_CONFIG = PACKAGE_DIR / "configs" / "tiny.yaml"
BACKENDS = ("auto", "triton", "torch")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
TEACHER_DTYPES = ("float32", "bfloat16", "float16")
SECTIONS = ("model", "convert", "task", "pretrain", "distill")  # typed sub-trees; train/sft/bitnet_sft stay dicts


@dataclass
class ModelSection:
    name_or_path: str | None = None     # null: build the tiny generated model
    tiny: dict = field(default_factory=dict)  # bitdistill.tiny.build_tiny_base sizes


@dataclass
class ConvertSection:
    subln: bool = True
    layout: str = "subln"               # "subln": before o_proj and down_proj (paper); "allnorm": before every one
    per_channel: bool = False
    subln_eps: float | None = None      # null: the model's rms_norm_eps (allnorm: the authors' 1e-8)


@dataclass
class CorpusSection:
    file: str | None = None             # a local .jsonl/.json/.csv/.parquet
    files: list = field(default_factory=list)   # more local files, read after `file` (same text_column)
    name: str | None = None             # or a hub dataset
    subset: str | None = None
    split: str = "train"
    text_column: str = "text"


@dataclass
class PretrainSection:
    block_size: int = 128
    token_budget: int | None = None     # null: the whole corpus once
    corpus: CorpusSection = field(default_factory=CorpusSection)
    train: dict = field(default_factory=dict)   # TrainArgs overrides


@dataclass
class DistillSection:
    loss: DistillConfig = field(default_factory=DistillConfig)
    student: str | None = None          # null: <output_dir>/pretrain/model; "convert": Stage 1 only (no Stage 2)
    teacher: str | None = None          # null: <output_dir>/sft/model
    teacher_dtype: str = "bfloat16"
    train: dict = field(default_factory=dict)   # TrainArgs overrides


@dataclass
class PipelineConfig:
    seed: int = 0
    output_dir: str = "outputs/tiny"
    stages: list = field(default_factory=lambda: list(STAGES))
    backend: str = "auto"               # bitkernels path: fused Triton ("auto" on GPU) or the torch reference
    mixed_precision: str = "auto"       # "auto": bf16 on GPU, none on CPU
    tiny_data: bool = False             # generate the tiny task and corpus even with a real model
    tiny_data_sizes: dict = field(default_factory=dict)
    model: ModelSection = field(default_factory=ModelSection)
    convert: ConvertSection = field(default_factory=ConvertSection)
    task: TaskSpec | None = None        # always set by parse_config (a task section is required)
    train: dict = field(default_factory=dict)   # TrainArgs shared by all stages (checked by train_args)
    sft: dict = field(default_factory=dict)
    bitnet_sft: dict = field(default_factory=dict)
    pretrain: PretrainSection = field(default_factory=PretrainSection)
    distill: DistillSection = field(default_factory=DistillSection)

    def train_args(self, stage: str) -> TrainArgs:
        """The stage's TrainArgs: ``train`` with the stage section's overrides on top."""
        section = {"sft": self.sft, "bitnet-sft": self.bitnet_sft, "pretrain": self.pretrain.train,
                   "distill": self.distill.train}[stage]
        return _train_args({**self.train, **section}, stage.replace("-", "_"))


# ------------------------------------------------------------------------------------------------------ loading

def read_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> dict:
    """The YAML mapping with ``--set key.path=value`` overrides applied (values parsed as YAML); not yet checked."""
    import yaml

    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file() and (PACKAGE_DIR / path).is_file():
        path = PACKAGE_DIR / path  # `--config configs/tiny.yaml` from anywhere
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist (see bitdistill/configs/)")
    cfg = yaml.safe_load(path.read_text()) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of sections, got {type(cfg).__name__}")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key.path=value, got {item!r}")
        key, value = item.split("=", 1)
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {key}: {p!r} is not a section")
        node[leaf] = _override_value(value)
    return cfg


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _override_value(text: str):
    """A ``--set`` value parsed as YAML, except that ``3e-05`` (how Python prints small floats) is a float: YAML 1.1
    reads exponents without a dot as strings. A quoted value stays a string."""
    import yaml

    value = yaml.safe_load(text)
    if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(text.strip()):
        return float(value)
    return value


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> dict:
    """``read_config``, checked by ``parse_config`` (a ValueError names the bad key): the mapping, for callers that
    read a few keys or record the config as given."""
    cfg = read_config(path, overrides)
    parse_config(cfg)
    return cfg


def parse_config(cfg: dict) -> PipelineConfig:
    """The checked, typed tree of a config mapping (the mapping itself is not changed)."""
    cfg = copy.deepcopy(cfg)
    top = _section(cfg, "", PipelineConfig)
    if isinstance(top.get("stages"), str):  # `--stages sft,distill`
        top["stages"] = top["stages"].split(",")
    out = PipelineConfig(**_typed(PipelineConfig, {k: v for k, v in top.items() if k not in SECTIONS}, ""))
    for key, choices in (("backend", BACKENDS), ("mixed_precision", MIXED_PRECISION)):
        if getattr(out, key) not in choices:
            raise ValueError(f"{key} must be one of {choices}, got {getattr(out, key)!r}")
    bad = [s for s in out.stages if s not in STAGES]
    if bad or not out.stages:
        raise ValueError(f"stages: unknown stage(s) {bad}; choose from {STAGES}")
    out.model = ModelSection(**_typed(ModelSection, _section(top, "model", ModelSection), "model."))
    out.convert = ConvertSection(**_typed(ConvertSection, _section(top, "convert", ConvertSection), "convert."))
    if out.convert.layout not in SUBLN_LAYOUTS:
        raise ValueError(f"convert.layout must be one of {SUBLN_LAYOUTS}, got {out.convert.layout!r}")
    out.task = TaskSpec(**_typed(TaskSpec, _section(top, "task", TaskSpec), "task."))
    train_names = {f.name for f in fields(TrainArgs)}
    out.train = _section(top, "train", TrainArgs)
    _train_args(out.train, "train")
    for stage in ("sft", "bitnet_sft"):
        setattr(out, stage, _section(top, stage, TrainArgs))
        _train_args({**out.train, **getattr(out, stage)}, stage)

    pre = _section(top, "pretrain", PretrainSection, extra=train_names)
    corpus = _section(pre, "corpus", CorpusSection, where="pretrain.")
    pre_own = {k: v for k, v in pre.items() if k in {"block_size", "token_budget"}}
    out.pretrain = PretrainSection(**_typed(PretrainSection, pre_own, "pretrain."),
                                   corpus=CorpusSection(**_typed(CorpusSection, corpus, "pretrain.corpus.")),
                                   train={k: v for k, v in pre.items() if k in train_names})
    if not all(isinstance(f, str) for f in out.pretrain.corpus.files):
        raise ValueError(f"pretrain.corpus.files must be a list of file paths, got {out.pretrain.corpus.files!r}")
    if out.pretrain.block_size < 2:
        raise ValueError(f"pretrain.block_size must be an integer >= 2, got {out.pretrain.block_size}")
    if out.pretrain.token_budget is not None and out.pretrain.token_budget < 1:
        raise ValueError(f"pretrain.token_budget must be a positive integer or null, got {out.pretrain.token_budget}")
    _train_args({**out.train, **out.pretrain.train}, "pretrain")

    loss_names = {f.name for f in fields(DistillConfig)}
    dist = _section(top, "distill", DistillSection, extra=train_names | loss_names, skip={"loss", "train"})
    out.distill = DistillSection(
        loss=DistillConfig(**_typed(DistillConfig, {k: v for k, v in dist.items() if k in loss_names}, "distill.")),
        **_typed(DistillSection, {k: v for k, v in dist.items() if k in {"student", "teacher", "teacher_dtype"}},
                 "distill."),
        train={k: v for k, v in dist.items() if k in train_names})
    if out.distill.teacher_dtype not in TEACHER_DTYPES:
        raise ValueError(f"distill.teacher_dtype must be one of {TEACHER_DTYPES}, got {out.distill.teacher_dtype!r}")
    _train_args({**out.train, **out.distill.train}, "distill")
    return out


def fill_tiny_paths(cfg: PipelineConfig, files: dict) -> PipelineConfig:
    """A copy of ``cfg`` in which ``tiny:<key>`` in any text setting names the generated tiny data file."""
    def visit(node, where):
        changes = {}
        for f in fields(node):
            v = getattr(node, f.name)
            if is_dataclass(v):
                changes[f.name] = visit(v, f"{where}{f.name}.")
            elif isinstance(v, str) and v.startswith("tiny:"):
                if v[5:] not in files:
                    raise ValueError(f"{where}{f.name}: {v!r} names no generated file; known: {sorted(files)}")
                changes[f.name] = files[v[5:]]
        return replace(node, **changes) if changes else node
    return visit(cfg, "")


# ------------------------------------------------------------------------------------------------------ checks

def _section(parent: dict, name: str, cls, extra: set = frozenset(), skip: set = frozenset(),
             where: str = "") -> dict:
    """``parent[name]`` (``parent`` itself for the top level) as a dict whose keys all belong to ``cls`` (or
    ``extra``); an unknown key is an error that lists the known ones."""
    node = parent if not name else parent.get(name)
    if node is None:
        return {}
    label = f"{where}{name}" if name else "the config's top level"
    if not isinstance(node, dict):
        raise ValueError(f"{label} must be a mapping of settings, got {node!r}")
    known = ({f.name for f in fields(cls)} - set(skip)) | set(extra)
    unknown = set(node) - known
    if unknown:
        raise ValueError(f"unknown {label} key(s) {sorted(unknown)}; known: {sorted(known)}")
    return node


def _typed(cls, values: dict, where: str | None = None) -> dict:
    """Values cast to the dataclass fields' types: numbers from strings (YAML reads ``2e-3`` as text), and bool,
    text and list fields checked."""
    out = {}
    prefix = f"{cls.__name__}." if where is None else where
    for f in fields(cls):
        if f.name not in values:
            continue
        v, kind = values[f.name], str(f.type)
        optional = "None" in kind
        if v is None:
            if not optional and not kind.startswith(("dict", "list", "tuple")):
                raise ValueError(f"{prefix}{f.name} must not be null")
            out[f.name] = v
            continue
        try:
            if kind.startswith("float") and not isinstance(v, bool):
                v = float(v)
            elif kind.startswith("int") and not isinstance(v, bool):
                number = float(v)
                if number != int(number):
                    raise ValueError
                v = int(number)
            elif kind.startswith("bool") and not isinstance(v, bool):
                raise ValueError
            elif kind.startswith("str") and not isinstance(v, str):
                raise ValueError
            elif kind.startswith(("list", "tuple")) and not isinstance(v, (list, tuple)):
                raise ValueError
            elif kind.startswith("dict") and not isinstance(v, dict):
                raise ValueError
        except (TypeError, ValueError):
            raise ValueError(f"{prefix}{f.name} must be {_describe(kind)}, got {v!r}") from None
        out[f.name] = v
    return out


def _describe(kind: str) -> str:
    base = kind.split("|")[0].strip()
    text = {"float": "a number", "int": "an integer", "bool": "true or false", "str": "text", "list": "a list",
            "tuple": "a list", "dict": "a mapping"}.get(base.split("[")[0], base)
    return f"{text} ({kind})"


def _train_args(values: dict, section: str) -> TrainArgs:
    if values.get("compile") is False:  # YAML `compile: false`
        values = {**values, "compile": None}
    try:
        args = TrainArgs(**_typed(TrainArgs, values, f"{section}."))
    except ValueError as exc:  # TrainArgs names its keys train.*; train itself is checked first, so it is the stage's
        raise ValueError(str(exc).replace("train.", f"{section}.", 1)) from None
    args.compile = check_compile_mode(args.compile)
    return args


def as_plain(value: Any) -> Any:
    """A dataclass tree as plain YAML/JSON data (tuples as lists)."""
    if is_dataclass(value):
        return {f.name: as_plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, dict):
        return {k: as_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_plain(v) for v in value]
    return value

"""Tasks and corpora: loading (hub by name or local jsonl/csv/parquet), checking, encoding for a decoder, batching.

How a task is posed to a causal LM (a documented choice):
- classification (MNLI / QNLI / SST-2 style): the example is written with ``template`` (fields ``{text}`` and
  optionally ``{text_pair}``) and the model is trained to continue it with ``" " + label_words[label]`` then EOS
  (cross-entropy on those tokens only). No new head: the LM head is kept, so teacher and student logits can be
  distilled directly. Prediction = the label word whose first token has the highest logit at the answer position
  (a restricted argmax over the label words), so the metric never depends on free generation.
- summarization (CNN/DailyMail style): ``template`` (``{text}`` = the article) then ``" " + summary`` + EOS; loss on
  the summary tokens; evaluation generates greedily up to ``max_target_length`` tokens and scores ROUGE-1/2/L.
Over-long prompts are cut from the end of their longest field (the template's text and the answer cue stay).
"""
from __future__ import annotations

import csv
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

IGNORE_INDEX = -100
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(ValueError):
    """A dataset that cannot be used as configured (missing column, bad label, empty split...)."""


@dataclass
class TaskSpec:
    type: str = "classification"              # "classification" or "summarization"
    name: str | None = None                   # hub dataset name for datasets.load_dataset (e.g. "nyu-mll/glue")
    subset: str | None = None                 # hub config (e.g. "mnli")
    train_file: str | None = None             # or local files: .jsonl/.json/.csv/.parquet
    eval_file: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"               # classification: int id, or a string among label_words
    summary_column: str = "summary"           # summarization target
    label_words: list[str] = field(default_factory=list)
    template: str = "{text}\nAnswer:"
    max_length: int = 256                     # prompt + answer tokens
    max_target_length: int = 64               # summarization: answer budget (and generation length)
    max_train_examples: int | None = None
    max_eval_examples: int | None = None

    def __post_init__(self):
        if self.type not in ("classification", "summarization"):
            raise DataError(f"task.type must be 'classification' or 'summarization', got {self.type!r}")
        if self.type == "classification" and len(self.label_words) < 2:
            raise DataError("a classification task needs task.label_words: one word per label id, at least two "
                            "(e.g. [entailment, neutral, contradiction])")
        fields = set(re.findall(r"{(\w+)}", self.template))
        if "text" not in fields or not fields <= {"text", "text_pair"}:
            raise DataError(f"task.template must use {{text}} (and optionally {{text_pair}}), got {self.template!r}")
        if ("text_pair" in fields) != (self.text_pair_column is not None):
            raise DataError("task.template uses {text_pair} exactly when task.text_pair_column is set")


# ---------------------------------------------------------------------------------------------------- loading rows

def read_rows(file: str | None = None, name: str | None = None, subset: str | None = None,
              split: str = "train") -> list[dict[str, Any]]:
    """Rows (dicts) of a local file, or of a hub dataset via ``datasets.load_dataset(name, subset, split=split)``."""
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(f"data file {file!r} does not exist")
        kind = LOCAL_FORMATS.get(path.suffix.lower())
        if kind is None:
            raise DataError(f"{file}: unknown format {path.suffix!r}; use one of {sorted(LOCAL_FORMATS)}")
        if kind == "json":
            text = path.read_text(encoding="utf-8")
            if text.lstrip().startswith("["):
                return list(json.loads(text))
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        if kind == "csv":
            with path.open(newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
        import pyarrow.parquet as pq  # parquet needs pyarrow (a dependency of `datasets`)

        return pq.read_table(str(path)).to_pylist()
    if name is None:
        raise DataError("no data source: set a local file or a hub dataset name")
    import datasets  # imported here: only hub datasets need it

    return list(datasets.load_dataset(name, subset, split=split))


def _require_columns(rows: list[dict], columns: Iterable[str], where: str) -> None:
    if not rows:
        raise DataError(f"{where}: no rows")
    have = set(rows[0].keys())
    missing = [c for c in columns if c not in have]
    if missing:
        raise DataError(f"{where}: missing column(s) {missing}; the rows have columns {sorted(have)}. "
                        "Set task.text_column / text_pair_column / label_column / summary_column to match.")


def load_task_split(spec: TaskSpec, split: str) -> list[dict[str, Any]]:
    """Checked rows {"text", "text_pair"?, "label" | "summary"} of the train or eval split."""
    file = spec.train_file if split == "train" else spec.eval_file
    hub_split = spec.train_split if split == "train" else spec.eval_split
    where = file or f"{spec.name}/{spec.subset or ''}:{hub_split}"
    rows = read_rows(file, spec.name, spec.subset, hub_split)
    limit = spec.max_train_examples if split == "train" else spec.max_eval_examples
    rows = rows[:limit] if limit else rows
    target = spec.label_column if spec.type == "classification" else spec.summary_column
    columns = [spec.text_column, target] + ([spec.text_pair_column] if spec.text_pair_column else [])
    _require_columns(rows, columns, where)
    out = []
    for i, row in enumerate(rows):
        ex = {"text": str(row[spec.text_column])}
        if spec.text_pair_column:
            ex["text_pair"] = str(row[spec.text_pair_column])
        if spec.type == "classification":
            ex["label"] = _label_id(row[spec.label_column], spec.label_words, f"{where} row {i}")
        else:
            ex["summary"] = str(row[spec.summary_column])
        out.append(ex)
    return out


def _label_id(value: Any, label_words: list[str], where: str) -> int:
    if isinstance(value, str) and value in label_words:
        return label_words.index(value)
    try:
        label = int(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: label {value!r} is neither an integer id nor one of the label words "
                        f"{label_words}") from None
    if not 0 <= label < len(label_words):
        raise DataError(f"{where}: label {label} is out of range [0, {len(label_words)}) for label_words "
                        f"{label_words} (unlabeled test splits use -1: evaluate on a labeled split)")
    return label


def load_corpus_texts(file: str | None = None, name: str | None = None, subset: str | None = None,
                      split: str = "train", text_column: str = "text") -> Iterable[str]:
    """Texts of a local file (a list), or a stream of a hub dataset (read only as far as the token budget)."""
    if file is None and name is not None:
        import datasets

        stream = datasets.load_dataset(name, subset, split=split, streaming=True)
        return (str(row[text_column]) for row in stream)
    rows = read_rows(file, name, subset, split)
    _require_columns(rows, [text_column], file or f"{name}:{split}")
    return [str(r[text_column]) for r in rows]


# --------------------------------------------------------------------------------------------------------- encoding

def _template_parts(template: str) -> list[tuple[str, str]]:
    """('lit', text) and ('field', name) pieces of the template, in order."""
    parts, pos = [], 0
    for m in re.finditer(r"{(\w+)}", template):
        if m.start() > pos:
            parts.append(("lit", template[pos:m.start()]))
        parts.append(("field", m.group(1)))
        pos = m.end()
    if pos < len(template):
        parts.append(("lit", template[pos:]))
    return parts


def encode_prompt(tokenizer, template: str, example: dict, budget: int) -> list[int]:
    """Token ids of the filled template, at most ``budget`` long, cut from the end of the longest field."""
    pieces = []
    for kind, value in _template_parts(template):
        text = value if kind == "lit" else example[value]
        pieces.append([kind, tokenizer.encode(text, add_special_tokens=False)])
    fixed = sum(len(ids) for kind, ids in pieces if kind == "lit")
    if fixed >= budget:
        raise DataError(f"the template alone takes {fixed} tokens, more than the budget {budget}: raise "
                        "task.max_length")
    while sum(len(ids) for _, ids in pieces) > budget:
        longest = max((p for p in pieces if p[0] == "field"), key=lambda p: len(p[1]))
        excess = sum(len(ids) for _, ids in pieces) - budget
        longest[1] = longest[1][:max(0, len(longest[1]) - excess)]
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id else []
    return bos + [t for _, ids in pieces for t in ids]


def label_token_ids(tokenizer, label_words: list[str]) -> list[int]:
    """First token of each ``" " + word``; they must differ, since prediction compares them."""
    firsts = [tokenizer.encode(" " + w, add_special_tokens=False)[0] for w in label_words]
    if len(set(firsts)) != len(firsts):
        raise DataError(f"label words {label_words} do not start with distinct tokens ({firsts}); "
                        "choose label words whose first tokens differ")
    return firsts


def encode_example(tokenizer, spec: TaskSpec, example: dict, with_answer: bool = True) -> dict:
    """input_ids / labels (IGNORE_INDEX on the prompt) / prompt_length; without the answer for generation."""
    if spec.type == "classification":
        answer = tokenizer.encode(" " + spec.label_words[example["label"]], add_special_tokens=False)
    else:
        answer = tokenizer.encode(" " + example["summary"], add_special_tokens=False)[:spec.max_target_length - 1]
    answer = answer + [tokenizer.eos_token_id]
    budget = spec.max_length - (len(answer) if spec.type == "classification" else spec.max_target_length)
    prompt = encode_prompt(tokenizer, spec.template, example, budget)
    if not with_answer:
        return {"input_ids": prompt, "prompt_length": len(prompt)}
    return {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer,
            "prompt_length": len(prompt)}


def _encoded(tokenizer, texts: Iterable[str], chunk: int = 1024) -> Iterator[list[int]]:
    """Token ids of each text, in order, encoded ``chunk`` texts a call: a fast tokenizer's batch call is many times
    quicker than one call per text, and a stream is read only a chunk ahead of the consumer."""
    texts = iter(texts)
    while batch := list(itertools.islice(texts, chunk)):
        yield from tokenizer(batch, add_special_tokens=False)["input_ids"]


def pack_corpus(tokenizer, texts: Iterable[str], block_size: int, token_budget: int | None) -> list[dict]:
    """Concatenate texts (EOS between them) and cut into ``block_size`` blocks, stopping at ``token_budget``."""
    stream, blocks = [], []
    limit = math.inf if not token_budget else token_budget
    for ids in _encoded(tokenizer, texts):
        stream += ids + [tokenizer.eos_token_id]
        while len(stream) >= block_size and len(blocks) * block_size < limit:
            block, stream = stream[:block_size], stream[block_size:]
            blocks.append({"input_ids": block, "labels": list(block)})
        if len(blocks) * block_size >= limit:
            break
    if not blocks:
        raise DataError(f"the corpus gives no full block of {block_size} tokens; add text or lower block_size")
    return blocks


def collate(examples: list[dict], pad_id: int, left_pad: bool = False,
            pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Pad to the longest example, rounded up to ``pad_to_multiple_of`` (fewer distinct shapes: compiled layers and
    CUDA graphs are recorded once per shape): input_ids, attention_mask, labels (IGNORE_INDEX on padding)."""
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    width = max(len(e["input_ids"]) for e in examples)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    ids, mask, labels = [], [], []
    for e in examples:
        n, pad = len(e["input_ids"]), width - len(e["input_ids"])
        order = (lambda seq, fill: [fill] * pad + seq) if left_pad else (lambda seq, fill: seq + [fill] * pad)
        ids.append(order(list(e["input_ids"]), pad_id))
        mask.append(order([1] * n, 0))
        if "labels" in e:
            labels.append(order(list(e["labels"]), IGNORE_INDEX))
    batch = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
    if labels:
        batch["labels"] = torch.tensor(labels)
    return batch

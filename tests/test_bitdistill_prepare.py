"""bitdistill.prepare's Stage-2 documentation corpus: prose kept, code and markup dropped, a missing package named;
and the config's extra corpus files."""
import json

import pytest

from bitdistill import prepare
from bitdistill.config import parse_config, read_config

RST = """\
functools --- Higher-order functions
====================================

.. module:: functools
   :synopsis: Higher-order functions.

The :mod:`functools` module is for **higher-order** functions, see `the tutorial <https://x.org>`_.

.. function:: cache(user_function)

   Simple lightweight unbounded function cache, sometimes called ``memoize``.

   For example::

       @cache
       def factorial(n):
           return n * factorial(n-1) if n else 1

   The cache is threadsafe so the wrapped function can be used in many threads.

.. code-block:: c

   int main(void) { return 0; }

+-------+-------+
| table | cells |
+-------+-------+

.. note:: a short note.
"""


def test_rst_prose_keeps_running_text_and_drops_code_and_markup():
    got = prepare.rst_prose_paragraphs(RST.splitlines(), min_chars=20)
    assert got == [
        "functools Higher-order functions",                  # the heading's underline and dashes go
        "The functools module is for higher-order functions, see the tutorial.",
        "Simple lightweight unbounded function cache, sometimes called memoize.",
        "The cache is threadsafe so the wrapped function can be used in many threads.",
    ]


def test_prepare_docs_reads_installed_packages_and_names_missing_ones(tmp_path):
    root = tmp_path / "pkg" / "_sources" / "library"
    root.mkdir(parents=True)
    (root / "functools.rst.txt").write_text(RST)
    (root / "ignored.html").write_text("<p>The html build is not read, only the reST sources.</p>")
    out = tmp_path / "out"
    made = prepare.prepare_docs(out, {"a-doc": str(tmp_path / "pkg" / "_sources"), "b-doc": str(tmp_path / "no")})
    rows = [json.loads(line) for line in (out / "corpus" / "docs.jsonl").open()]
    assert made["file"]["rows"] == len(rows) == 3 and made["sources"] == ["a-doc (1 reST files, 3 paragraphs)"]
    assert all("html" not in r["text"] for r in rows)
    with pytest.raises(prepare.MissingSourceError, match="apt-get install a-doc b-doc"):
        prepare.prepare_docs(out, {"a-doc": str(tmp_path / "none"), "b-doc": str(tmp_path / "no")})


def test_corpus_files_must_be_a_list_of_paths():
    def corpus_files(value):
        cfg = read_config("bitdistill/configs/smollm2-135m-tweets.yaml", [f"pretrain.corpus.files={value}"])
        return parse_config(cfg).pretrain.corpus.files

    assert corpus_files("[b.jsonl, c.jsonl]") == ["b.jsonl", "c.jsonl"]
    with pytest.raises(ValueError, match="files"):
        corpus_files("b.jsonl")
    with pytest.raises(ValueError, match="list of file paths"):
        corpus_files("[1]")

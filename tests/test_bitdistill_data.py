"""Task encoding: prompt/answer layout, truncation, local formats, label checks, corpus packing."""
import pytest

pytest.importorskip("tokenizers")
from bitdistill import tiny  # noqa: E402
from bitdistill.data import (  # noqa: E402
    IGNORE_INDEX,
    DataError,
    TaskSpec,
    collate,
    encode_example,
    label_token_ids,
    load_task_split,
    pack_corpus,
)


@pytest.fixture(scope="module")
def tok():
    texts = ["the movie was great.", "the book was awful.", "Review:", "Sentiment:", " positive", " negative",
             "premise hypothesis yes no"] * 30
    return tiny.build_tokenizer(texts, vocab_size=300)


def spec(**kw):
    base = dict(label_words=["negative", "positive"], template="Review: {text}\nSentiment:", max_length=32)
    base.update(kw)
    return TaskSpec(**base)


def test_answer_tokens_are_the_only_labels(tok):
    enc = encode_example(tok, spec(), {"text": "the movie was great.", "label": 1})
    n = enc["prompt_length"]
    answer = tok.encode(" positive", add_special_tokens=False) + [tok.eos_token_id]
    assert enc["input_ids"][n:] == answer and enc["labels"][n:] == answer
    assert enc["labels"][:n] == [IGNORE_INDEX] * n
    assert tok.decode(enc["input_ids"][:n]) == "Review: the movie was great.\nSentiment:"


def test_long_text_is_cut_from_its_end_and_the_cue_stays(tok):
    enc = encode_example(tok, spec(max_length=16), {"text": "the movie was great. " * 20, "label": 0})
    assert len(enc["input_ids"]) == 16
    assert tok.decode(enc["input_ids"][:enc["prompt_length"]]).endswith("\nSentiment:")


def test_collate_pads_right_or_left(tok):
    a = encode_example(tok, spec(), {"text": "great.", "label": 1})
    b = encode_example(tok, spec(), {"text": "the movie was awful.", "label": 0})
    right = collate([a, b], pad_id=0)
    assert right["attention_mask"][0].tolist() == [1] * len(a["input_ids"]) + [0] * (
        len(b["input_ids"]) - len(a["input_ids"]))
    assert (right["labels"][0][right["attention_mask"][0] == 0] == IGNORE_INDEX).all()
    left = collate([a, b], pad_id=0, left_pad=True)
    assert left["input_ids"][0, -1].item() == a["input_ids"][-1]
    bucketed = collate([a, b], pad_id=0, pad_to_multiple_of=16)
    width = bucketed["input_ids"].shape[1]
    assert width % 16 == 0 and len(b["input_ids"]) <= width < len(b["input_ids"]) + 16
    assert bucketed["attention_mask"].sum().item() == len(a["input_ids"]) + len(b["input_ids"])
    assert (bucketed["labels"][bucketed["attention_mask"] == 0] == IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        collate([a, b], pad_id=0, pad_to_multiple_of=0)


def test_local_csv_with_string_labels_and_pairs(tmp_path):
    f = tmp_path / "nli.csv"
    f.write_text("premise,hypothesis,label\nA man runs.,Someone moves.,entailment\nA cat.,A dog.,2\n")
    s = TaskSpec(train_file=str(f), text_column="premise", text_pair_column="hypothesis",
                 label_words=["entailment", "neutral", "contradiction"],
                 template="Premise: {text}\nHypothesis: {text_pair}\nAnswer:")
    rows = load_task_split(s, "train")
    assert [r["label"] for r in rows] == [0, 2] and rows[0]["text_pair"] == "Someone moves."


def test_bad_specs_and_labels(tmp_path):
    with pytest.raises(DataError, match="label_words"):
        TaskSpec(label_words=["only"])
    with pytest.raises(DataError, match="text_pair"):
        TaskSpec(label_words=["a", "b"], template="{text} {text_pair}")
    f = tmp_path / "x.jsonl"
    f.write_text('{"text": "a", "label": "maybe"}\n')
    with pytest.raises(DataError, match="neither an integer id nor one of the label words"):
        load_task_split(spec(train_file=str(f)), "train")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_task_split(spec(train_file=str(tmp_path / "missing.jsonl")), "train")
    with pytest.raises(DataError, match="unknown format"):
        (tmp_path / "x.txt").write_text("hi")
        load_task_split(spec(train_file=str(tmp_path / "x.txt")), "train")


def test_label_words_need_distinct_first_tokens(tok):
    assert len(set(label_token_ids(tok, ["negative", "positive"]))) == 2
    with pytest.raises(DataError, match="distinct"):
        label_token_ids(tok, ["movie", "movie"])


def test_pack_corpus_respects_block_and_budget(tok):
    blocks = pack_corpus(tok, ["the movie was great."] * 50, block_size=8, token_budget=40)
    assert len(blocks) == 5 and all(len(b["input_ids"]) == 8 == len(b["labels"]) for b in blocks)
    with pytest.raises(DataError, match="no full block"):
        pack_corpus(tok, ["hi"], block_size=64, token_budget=None)


def test_pack_corpus_encodes_in_chunks_as_one_text_at_a_time(tok):
    texts = [f"the movie number {i} was {'great' if i % 3 else 'bad'}." for i in range(2500)]
    stream = [t for text in texts for t in tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]]
    blocks = pack_corpus(tok, iter(texts), block_size=16, token_budget=None)
    assert [b["input_ids"] for b in blocks] == [stream[i:i + 16] for i in range(0, len(stream) - 15, 16)]
    assert len(pack_corpus(tok, texts, block_size=16, token_budget=16 * 70)) == 70

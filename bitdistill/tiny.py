"""The embedded default: a tiny generated task, a tokenizer trained offline on it, and a tiny Qwen3-architecture
model, so the whole pipeline runs on a CPU in minutes with no network.

- Classification ("tiny-sentiment"): a review made of a few generated sentences, exactly one of which carries an
  opinion word; label 1 ("positive") or 0 ("negative") by its polarity. Solving it needs attention to the one word
  that matters among distractor sentences.
- Summarization ("tiny-lead"): an article of several sentences; the summary is its first sentence (lead-1).
- Corpus (Stage 2): generated sentences of the same grammar, opinion words included, no labels.
Everything is a pure function of the seed.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

NOUNS = ["movie", "book", "song", "meal", "hotel", "phone", "game", "show", "car", "trip", "room", "park", "city",
         "class", "team", "store", "coffee", "story", "garden", "camera"]
VERBS = ["saw", "found", "bought", "tried", "visited", "watched", "read", "used", "liked", "heard"]
PEOPLE = ["my friend", "the teacher", "a neighbor", "my sister", "the driver", "our guest", "the chef", "my father"]
PLACES = ["in the morning", "last week", "after work", "on sunday", "with family", "near the river", "at night"]
POSITIVE = ["great", "wonderful", "excellent", "lovely", "brilliant", "delightful", "superb", "fantastic"]
NEGATIVE = ["terrible", "awful", "horrible", "boring", "dreadful", "disappointing", "poor", "ugly"]
LABEL_WORDS = ["negative", "positive"]
NEGATION_RATE = 0.0
SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>"]


def _neutral_sentence(rng: random.Random) -> str:
    return f"{rng.choice(PEOPLE)} {rng.choice(VERBS)} the {rng.choice(NOUNS)} {rng.choice(PLACES)}."


def _opinion_sentence(rng: random.Random, positive: bool) -> str:
    """One opinion word. ``NEGATION_RATE`` of them are negated ("was not awful" is positive): a randomly initialised
    tiny model does not learn negation within the default budget, so the default leaves it off."""
    negated = rng.random() < NEGATION_RATE
    word = rng.choice(POSITIVE if positive != negated else NEGATIVE)
    verb = "was not" if negated else "was"
    return rng.choice([f"the {rng.choice(NOUNS)} {verb} {word}.", f"it {verb} {word} {rng.choice(PLACES)}.",
                       f"{rng.choice(PEOPLE)} said the {rng.choice(NOUNS)} {verb} {word}."])


def sentiment_example(rng: random.Random) -> dict:
    label = rng.randrange(2)
    sentences = [_neutral_sentence(rng) for _ in range(rng.randint(1, 3))]
    sentences.insert(rng.randrange(len(sentences) + 1), _opinion_sentence(rng, label == 1))
    return {"text": " ".join(sentences), "label": label}


def lead_example(rng: random.Random) -> dict:
    sentences = [_neutral_sentence(rng) if rng.random() < 0.7 else _opinion_sentence(rng, rng.random() < 0.5)
                 for _ in range(rng.randint(3, 5))]
    return {"article": " ".join(sentences), "summary": sentences[0]}


def corpus_text(rng: random.Random) -> str:
    return " ".join(_neutral_sentence(rng) if rng.random() < 0.6 else _opinion_sentence(rng, rng.random() < 0.5)
                    for _ in range(rng.randint(2, 6)))


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def generate_data(out_dir: str | Path, seed: int = 0, n_train: int = 2000, n_eval: int = 200,
                  n_corpus: int = 4000) -> dict[str, str]:
    """Write the tiny task splits and corpus as jsonl under ``out_dir`` (skipped if present); return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"sentiment_train": out / "sentiment_train.jsonl", "sentiment_eval": out / "sentiment_eval.jsonl",
             "lead_train": out / "lead_train.jsonl", "lead_eval": out / "lead_eval.jsonl",
             "corpus": out / "corpus.jsonl"}
    makers = {"sentiment_train": (sentiment_example, n_train, 1), "sentiment_eval": (sentiment_example, n_eval, 2),
              "lead_train": (lead_example, n_train, 3), "lead_eval": (lead_example, n_eval, 4),
              "corpus": (lambda r: {"text": corpus_text(r)}, n_corpus, 5)}
    for key, (make, n, offset) in makers.items():
        if not files[key].is_file():
            rng = random.Random(seed * 1000 + offset)
            _write_jsonl(files[key], [make(rng) for _ in range(n)])
    return {k: str(v) for k, v in files.items()}


def build_tokenizer(texts: list[str], vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained on ``texts``, as a transformers PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|endoftext|>")


def tiny_qwen3_config(vocab_size: int, hidden_size: int = 64, num_hidden_layers: int = 2,
                      num_attention_heads: int = 4, num_key_value_heads: int = 2, intermediate_size: int = 192,
                      max_position_embeddings: int = 512, **extra):
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                       num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
                       head_dim=hidden_size // num_attention_heads, intermediate_size=intermediate_size,
                       max_position_embeddings=max_position_embeddings, tie_word_embeddings=True, **extra)


def build_tiny_base(out_dir: str | Path, data_files: dict[str, str], seed: int = 0, vocab_size: int = 1024,
                    **config_kwargs) -> str:
    """Train the tokenizer and save a randomly initialised tiny Qwen3 (the "full-precision model" of the tiny run)
    with it under ``out_dir`` (skipped if present, written atomically); return the directory."""
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return str(out)
    texts = []
    for key in ("corpus", "sentiment_train", "lead_train"):
        for line in Path(data_files[key]).read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            texts += [str(v) for v in row.values() if isinstance(v, str)]
    texts += [" " + w for w in LABEL_WORDS] * 50 + ["Review:", "Sentiment:", "Article:", "Summary:"] * 50
    tokenizer = build_tokenizer(texts, vocab_size)
    torch.manual_seed(seed)
    config = tiny_qwen3_config(len(tokenizer), bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id, **config_kwargs)
    model = AutoModelForCausalLM.from_config(config)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.replace(out)
    return str(out)

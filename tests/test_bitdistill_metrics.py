"""ROUGE-1/2/L (F1) against hand-computed values, and rouge-score where it is installed."""
import pytest

from bitdistill.metrics import lcs_length, rouge_scores, rouge_tokenize


def test_tokenize_lowercases_and_splits_on_non_alphanumerics():
    assert rouge_tokenize("The cat's hat, 2x!") == ["the", "cat", "s", "hat", "2x"]


def test_hand_computed_example():
    # candidate: the cat sat on the mat (6) / reference: the cat is on the mat today (7)
    s = rouge_scores("The cat sat on the mat.", "the cat is on the mat today")
    # unigrams clipped overlap: the x2, cat, on, mat = 5 -> P 5/6, R 5/7
    assert s["rouge1"] == pytest.approx(2 * (5 / 6) * (5 / 7) / (5 / 6 + 5 / 7))
    # bigrams: (the cat), (on the), (the mat) = 3 of 5 and 6
    assert s["rouge2"] == pytest.approx(2 * (3 / 5) * (3 / 6) / (3 / 5 + 3 / 6))
    # LCS: the cat on the mat = 5
    assert s["rougeL"] == pytest.approx(2 * (5 / 6) * (5 / 7) / (5 / 6 + 5 / 7))


def test_edge_cases():
    assert rouge_scores("", "a b") == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    assert rouge_scores("a b c", "a b c") == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert rouge_scores("a", "a")["rouge2"] == 0.0          # no bigram on either side
    assert lcs_length(list("abcbdab"), list("bdcaba")) == 4
    assert rouge_scores("b a", "a b")["rougeL"] == pytest.approx(0.5)


def test_matches_rouge_score_package():
    rs = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rs.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    pairs = [("police killed the gunman", "the gunman was shot dead by police"),
             ("a b a b a", "b a b"), ("Hello, World! hello", "hello world")]
    for cand, ref in pairs:
        want = scorer.score(ref, cand)
        got = rouge_scores(cand, ref)
        for k in ("rouge1", "rouge2", "rougeL"):
            assert got[k] == pytest.approx(want[k].fmeasure)

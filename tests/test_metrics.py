"""Metrics against small hand-computed examples."""
from __future__ import annotations

import pytest

from calm_utils import metrics as m


def test_bleu_identical():
    s = ["the cat sat on the mat today", "a dog ran in the big park"]
    assert m.bleu(s, s) == pytest.approx(100.0)
    assert m.bleu(s, [[x, "something else entirely"] for x in s]) == pytest.approx(100.0)
    assert m.sentence_bleu("the cat", "the cat") == pytest.approx(100.0)
    assert 0.0 <= m.sentence_bleu("the cat sat", "a dog ran") < 100.0


def test_bleu_length_mismatch():
    with pytest.raises(ValueError):
        m.bleu(["a"], ["a", "b"])


def test_rouge_l():
    assert m.rouge_l("the cat sat", "the cat sat") == pytest.approx(1.0)
    assert m.rouge_l("cats running", "cat runs") == pytest.approx(1.0)  # stemming
    # LCS("a b c d", "a c e") = 2 -> P = 2/4, R = 2/3, F = 4/7
    assert m.rouge_l("a b c d", "a c e") == pytest.approx(4 / 7)
    assert m.rouge_l("x y", ["nothing", "x y"]) == pytest.approx(1.0)


def test_squad_f1_em():
    # normalised pred "cat sat" vs gold "cat sat on mat": P=1, R=2/4 -> F1 = 2/3
    assert m.squad_f1("The cat sat.", ["the cat sat on the mat"]) == pytest.approx(2 / 3)
    assert m.squad_f1("Denver Broncos", ["Broncos", "Denver Broncos"]) == pytest.approx(1.0)
    assert m.squad_em("The Denver Broncos!", ["Denver Broncos"]) == 1.0
    assert m.squad_em("Broncos", ["Denver Broncos"]) == 0.0
    assert m.squad_f1("xyz", ["abc"]) == 0.0
    assert m.normalize_answer("  The  Quick, brown fox! ") == "quick brown fox"


def test_token_f1():
    assert m.token_f1("x b c", "b c d") == pytest.approx(2 / 3)
    assert m.token_f1("a b c", "b c d") == pytest.approx(0.8)  # "a" is an article, dropped
    assert m.token_f1("", "") == 1.0
    assert m.token_f1("x", "") == 0.0


@pytest.mark.parametrize("metric", m.CONSISTENCY_METRICS)
def test_textual_consistency_bounds(metric):
    assert m.textual_consistency("the cat sat on the mat", "the cat sat on the mat", metric) == pytest.approx(1.0)
    assert m.textual_consistency("", "", metric) == 1.0
    assert m.textual_consistency("hello", "", metric) == 0.0
    for a, b in [("the cat sat", "a dog ran far"), ("one two three", "one two four"), ("x", "y z")]:
        assert 0.0 <= m.textual_consistency(a, b, metric) <= 1.0


def test_textual_consistency_unknown():
    with pytest.raises(ValueError, match="rouge_l"):
        m.textual_consistency("a", "a", "meteor")

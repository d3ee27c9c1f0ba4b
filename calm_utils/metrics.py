"""Quality metrics: BLEU (sacrebleu), ROUGE-L (rouge-score), SQuAD v1.1 EM/F1, textual consistency.

Textual consistency compares an early-exit output with the full-model output
(CALM's "textual consistency" constraint); every metric there lies in [0, 1].
"""
from __future__ import annotations

import re
import string
from collections import Counter
from functools import lru_cache

import sacrebleu

CONSISTENCY_METRICS = ("rouge_l", "bleu", "token_f1")


def bleu(hyps: list[str], refs: list[str] | list[list[str]]) -> float:
    """Corpus BLEU (sacrebleu defaults, 0-100).

    ``refs`` is one reference per hypothesis (``list[str]``) or several per hypothesis
    (``list[list[str]]``, ``refs[i]`` = references of ``hyps[i]``; all the same length)."""
    hyps = list(hyps)
    if len(refs) != len(hyps):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} reference entries")
    if refs and not isinstance(refs[0], str):
        n = {len(r) for r in refs}
        if len(n) != 1:
            raise ValueError("every hypothesis needs the same number of references")
        streams = [[r[j] for r in refs] for j in range(n.pop())]  # sacrebleu wants one stream per reference slot
    else:
        streams = [list(refs)]
    return float(sacrebleu.corpus_bleu(hyps, streams).score)


def sentence_bleu(hyp: str, ref: str | list[str]) -> float:
    """Sentence BLEU with effective order (sacrebleu, 0-100)."""
    refs = [ref] if isinstance(ref, str) else list(ref)
    return float(sacrebleu.sentence_bleu(hyp, refs, use_effective_order=True).score)


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(hyp: str, ref_or_refs: str | list[str]) -> float:
    """ROUGE-L F-measure in [0, 1] (rouge-score, Porter stemming), max over references."""
    refs = [ref_or_refs] if isinstance(ref_or_refs, str) else list(ref_or_refs)
    if not refs:
        raise ValueError("rouge_l needs at least one reference")
    scorer = _rouge_scorer()
    return max(float(scorer.score(r, hyp)["rougeL"].fmeasure) for r in refs)


# --- SQuAD v1.1 official evaluation (normalisation, EM, F1) ---------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD v1.1 normalisation: lowercase, drop punctuation and articles, squeeze whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def token_f1(a: str, b: str) -> float:
    """SQuAD token-overlap F1 in [0, 1] between two strings (after :func:`normalize_answer`).

    Symmetric. Two strings that are both empty after normalisation give 1.0; one empty gives 0.0."""
    ta, tb = normalize_answer(a).split(), normalize_answer(b).split()
    if not ta and not tb:
        return 1.0
    common = Counter(ta) & Counter(tb)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(ta), same / len(tb)
    return 2 * precision * recall / (precision + recall)


def _golds(gold_answers: str | list[str]) -> list[str]:
    golds = [gold_answers] if isinstance(gold_answers, str) else list(gold_answers)
    if not golds:
        raise ValueError("need at least one gold answer")
    return golds


def squad_f1(pred: str, gold_answers: str | list[str]) -> float:
    """SQuAD v1.1 F1 in [0, 1]: max token F1 of ``pred`` over the gold answers."""
    return max(token_f1(pred, g) for g in _golds(gold_answers))


def squad_em(pred: str, gold_answers: str | list[str]) -> float:
    """SQuAD v1.1 exact match (1.0 or 0.0) after normalisation, max over the gold answers."""
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(g) for g in _golds(gold_answers)))


def textual_consistency(early: str, full: str, metric: str = "rouge_l") -> float:
    """Similarity in [0, 1] of an early-exit output to the full-model output.

    ``metric``: 'rouge_l' (F-measure), 'bleu' (sentence BLEU / 100, ``full`` as reference)
    or 'token_f1'. Two empty (whitespace-only) strings give 1.0; exactly one empty gives 0.0."""
    if metric not in CONSISTENCY_METRICS:
        raise ValueError(f"unknown consistency metric {metric!r}; options: {', '.join(CONSISTENCY_METRICS)}")
    e, f = early.strip(), full.strip()
    if not e and not f:
        return 1.0
    if not e or not f:
        return 0.0
    if metric == "rouge_l":
        score = rouge_l(e, f)
    elif metric == "bleu":
        score = sentence_bleu(e, f) / 100.0
    else:
        score = token_f1(e, f)
    return min(1.0, max(0.0, score))

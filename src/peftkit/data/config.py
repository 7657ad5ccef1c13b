"""The ``data:`` section of a run config: where the examples come from and which columns mean what.

Read by :func:`peftkit.data.files.load_examples` and the bundled data set loaders. Its rules, each
problem headed by its field path: :func:`data_problems` checks the values alone, and
:func:`data_source_problems` that the examples can be found (a bundled name, existing files, a
well-formed Hub id) without reading any of them.
"""

from __future__ import annotations

import codecs
import difflib
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "validation", "test")


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
        add_special_tokens: Causal-LM tasks: tokens added to the tokenizer as special tokens (a chat
            template's ``<|im_start|>``, ``<|im_end|>`` for a base model), or already in it and to be
            trained anyway. The model's embeddings grow to hold new ones (new rows start at the mean of the
            existing rows), the adapter trains their rows (trainable tokens, docs/tokens.md), and the
            tokenizer is saved beside the adapter.
        pad_to_multiple_of: Text tasks: pad each batch's length up to a multiple of this many tokens, or
            "auto" (the default): 8 when the run computes in bf16 (``train.precision`` bf16 or auto
            resolving to it, or a bf16/fp16 base), 1 (the batch's longest example) in fp32. On a CPU every
            new length compiles and keeps new bf16 kernels (oneDNN's primitive cache): padded lengths bound
            their number, which measured less memory and no slower steps (docs/performance.md).
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
    add_special_tokens: list[str] | None = None
    pad_to_multiple_of: int | str = "auto"


def padded_width(longest: int, multiple: int, limit: int | None) -> int:
    """``longest`` rounded up to a multiple of ``multiple`` (``data.pad_to_multiple_of``), but never past
    ``limit`` (``data.max_length``: the model may have no positions beyond it) unless already there."""
    width = -(-longest // multiple) * multiple
    return width if limit is None or width <= limit else max(longest, limit)


def padding_multiple(data: DataConfig) -> int:
    """The multiple a batch's length is padded up to: ``pad_to_multiple_of``, or 1 while it is still
    "auto" (a run resolves "auto" from its precision; a task used on its own pads to the longest)."""
    multiple = data.pad_to_multiple_of
    return multiple if isinstance(multiple, int) and not isinstance(multiple, bool) else 1


def data_problems(data: DataConfig) -> list[str]:
    """Every problem of the section's values (ranges, the encoding, the class names, the split)."""
    checks = [
        ("max_length", data.max_length > 0, "a positive number of tokens"),
        (
            "max_train_examples",
            data.max_train_examples is None or data.max_train_examples > 0,
            "a positive count, or null for all",
        ),
        (
            "max_eval_examples",
            data.max_eval_examples is None or data.max_eval_examples > 0,
            "a positive count, or null for all",
        ),
        ("split.validation", 0 <= data.split.validation < 1, "a fraction in [0, 1)"),
        ("split.test", 0 <= data.split.test < 1, "a fraction in [0, 1)"),
        (
            "encoding",
            _known_encoding(data.encoding),
            "a text encoding Python knows, e.g. utf-8, latin-1 or cp1252",
        ),
        (
            "pad_to_multiple_of",
            data.pad_to_multiple_of == "auto"
            or (
                isinstance(data.pad_to_multiple_of, int)
                and not isinstance(data.pad_to_multiple_of, bool)
                and data.pad_to_multiple_of >= 1
            ),
            "a positive number of tokens (8 suits bf16 and fp16 kernels), or auto",
        ),
        (
            "labels",
            data.labels is None or (len(data.labels) >= 2 and len(set(data.labels)) == len(data.labels)),
            "at least 2 distinct class names",
        ),
    ]
    problems = [
        f"data.{name}: expected {expected}, got {_value(data, name)!r}"
        for name, ok, expected in checks
        if not ok
    ]
    tokens = data.add_special_tokens
    if tokens is not None:
        if not tokens or not all(isinstance(t, str) and t.strip() for t in tokens):
            problems.append(
                f"data.add_special_tokens: expected a list of non-empty token strings, e.g. "
                f'["<|im_start|>", "<|im_end|>"], got {tokens!r}'
            )
        elif len(set(tokens)) != len(tokens):
            repeated = sorted({t for t in tokens if tokens.count(t) > 1})
            problems.append(
                f"data.add_special_tokens: {repeated} listed more than once; list each token once"
            )
    split = data.split
    if 0 <= split.validation < 1 and 0 <= split.test < 1 and split.validation + split.test >= 1:
        problems.append(
            f"data.split: validation + test must leave examples for training, got "
            f"{split.validation} + {split.test} >= 1"
        )
    return problems


def _value(data: DataConfig, path: str) -> object:
    for part in path.split("."):
        data = getattr(data, part)
    return data


def _known_encoding(name: str) -> bool:
    try:
        codecs.lookup(name)
    except LookupError:
        return False
    return True


def data_source_problems(data: DataConfig) -> list[str]:
    """What stops the examples from being found: no source or several, an unknown bundled name, a missing
    file or unknown file type, a malformed Hub id or split mapping, a chat template that is neither
    Jinja nor a file. Nothing is read and no network is asked."""
    from ..errors import ConfigError
    from .chat import template_problem
    from .files import file_format
    from .hub import config_problems as hub_problems
    from .registry import bundled_datasets

    given = [f"data.{name}" for name in ("name", "files", "hub") if getattr(data, name) is not None]
    if len(given) > 1:
        return [f"data: {' and '.join(given)} are each a source of examples; keep one of them"]
    if not given:
        return [
            f"data: set data.name to a bundled data set ({', '.join(bundled_datasets()) or 'none'}), "
            "data.files to a CSV / JSONL / Parquet file, or data.hub to a Hugging Face Hub data set"
        ]
    problem = template_problem(data.chat_template)
    problems = [f"data.chat_template: {problem}"] if problem else []
    if data.hub_splits and data.hub is None:
        problems.append("data.hub_splits: only read with data.hub; remove it or set data.hub")
    if data.hub is not None:
        return problems + hub_problems(data)
    if data.name is not None:
        known = bundled_datasets()
        if data.name in known:
            return problems
        close = difflib.get_close_matches(data.name.lower(), known, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return problems + [
            f"data.name: unknown bundled data set {data.name!r}; {hint}bundled: {', '.join(known) or 'none'} "
            "(or give data.files)"
        ]
    files = data.files if isinstance(data.files, dict) else {"": data.files}
    problems += [
        f"data.files.{key}: expected one of {', '.join(SPLITS)} as the key"
        for key in files
        if key and key not in SPLITS
    ]
    if isinstance(data.files, dict) and not data.files:
        problems.append("data.files: an empty mapping; give a file, or a mapping split -> file")
    for key, file in files.items():
        here = f"data.files.{key}" if key else "data.files"
        if not Path(file).expanduser().is_file():
            problems.append(
                f"{here}: {file!r} does not exist (relative paths start from {str(Path.cwd())!r})"
            )
        try:
            file_format(file, data.format)
        except ConfigError as exc:
            problems += [p for p in exc.problems if p not in problems]
    return problems

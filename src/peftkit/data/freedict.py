"""English -> French word and phrase pairs from the FreeDict dictionary (Debian ``dict-freedict-eng-fra``).

The package installs a dictd database: ``/usr/share/dictd/freedict-eng-fra.index`` (one line per
headword: ``headword<TAB>offset<TAB>length``, offset and length in dictd's base64 digits) and
``freedict-eng-fra.dict.dz`` (gzip-readable text; each entry is a headword line such as
``abandon /əbændən/`` followed by its senses, either one line or numbered ``1. ...``, ``2. ...``, each
a comma-separated list of translations).

Cleaning, per entry: the English side is the entry's own headword (the index key has punctuation
removed: ``uptodate`` for ``up-to-date``) without its pronunciation and part-of-speech tag; the French
side is the first clean translation of the first sense: not a template with ``...``, not an affix,
at most :data:`MAX_TARGET_WORDS` words (longer ones are definitions, not translations). Unicode
hyphens (U+2010) become ASCII ``-``; stray brackets (``repasser]``) are dropped. Skipped: the
database's own ``00database*`` records, headwords that are templates (``... ago``) or affixes (``-y``,
``water-``), entries whose first sense has no clean translation (37 of the 8,797 entries), and
headwords seen before ignoring case (15), so that no English phrase can be in two splits. That leaves
8,745 pairs.

Splits: the pairs, sorted by headword, are shuffled with ``random.Random(data.split.seed)``; test takes
the first ``int(n * test)``, validation the next ``int(n * validation)``, train the rest. The defaults
(seed 0, 10% / 10%) give 6,997 train / 874 validation / 874 test pairs.

Each example carries ``source`` / ``target`` (for the seq2seq task) and a ready instruction ``prompt``
(:data:`PROMPT_TEMPLATE`) with ``response`` = ``target`` (for the causal-LM task).
"""

from __future__ import annotations

import gzip
import random
import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DataNotInstalledError
from .registry import register_dataset

if TYPE_CHECKING:
    from .config import DataConfig

DICTD_FOLDER = Path("/usr/share/dictd")
DATABASE = "freedict-eng-fra"
INSTALL = "apt-get install dict-freedict-eng-fra"
PROMPT_TEMPLATE = (
    "Translate this English word or phrase into French. Answer with the French only.\nEnglish: {source}"
)
MAX_TARGET_WORDS = 6
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_PRONUNCIATION = re.compile(r"/[^/]*/")
_POS_TAG = re.compile(r"<[^>]*>")
_NUMBERING = re.compile(r"^\s*\d+\.\s*")
_ASIDE = re.compile(r"\s*(\([^)]*\)|\[[^\]]*\])")
_HYPHENS = str.maketrans({"\u2010": "-", "\u2011": "-"})


def dictd_files(folder: str | Path | None = None) -> tuple[Path, Path]:
    """The ``.index`` and ``.dict.dz`` files of the installed dictionary.

    Raises:
        DataNotInstalledError: either file is missing (the message gives the apt command).
    """
    folder = Path(folder) if folder is not None else DICTD_FOLDER
    index, body = folder / f"{DATABASE}.index", folder / f"{DATABASE}.dict.dz"
    missing = [str(p) for p in (index, body) if not p.is_file()]
    if missing:
        raise DataNotInstalledError(
            f"the English-French dictionary is not installed ({', '.join(missing)} not found); install the "
            f"Debian package with `{INSTALL}` (as root, after `apt-get update`), or run `make setup` as root"
        )
    return index, body


def decode_number(digits: str) -> int:
    """A dictd offset or length: base64 digits (``A``=0 ... ``/``=63), most significant first."""
    value = 0
    for char in digits:
        value = value * 64 + _B64.index(char)
    return value


def read_entries(folder: str | Path | None = None) -> Iterator[tuple[str, str]]:
    """``(index headword, entry text)`` for every index line, in index order.

    Raises:
        DataNotInstalledError: the dictionary files are missing.
    """
    index, body = dictd_files(folder)
    with gzip.open(body, "rb") as handle:
        data = handle.read()
    for line in index.read_text(encoding="utf-8").splitlines():
        headword, offset, length = line.split("\t")
        start = decode_number(offset)
        yield headword, data[start : start + decode_number(length)].decode("utf-8")


def parse_entry(text: str) -> tuple[str, str] | None:
    """The clean ``(English, French)`` pair of one dictd entry, or None when it has no clean pair.

    >>> parse_entry("ball /bɔːl/\\n1. bal\\n2. globe\\n")
    ('ball', 'bal')
    """
    lines = [line for line in text.strip("\n").split("\n") if line.strip()]
    if len(lines) < 2:
        return None
    source = _clean(_POS_TAG.sub("", _PRONUNCIATION.sub("", lines[0])))
    if not source or "..." in source or source[0] == "-" or source[-1] == "-":
        return None
    # The first sense's translations, in order; the first clean one wins ("ne ... que, seulement"
    # gives "seulement": a template with a gap is not a translation a model can be scored on).
    for candidate in _NUMBERING.sub("", lines[1]).split(","):
        target = _clean(candidate)
        if target and "..." not in target and target[0] != "-" and len(target.split()) <= MAX_TARGET_WORDS:
            return source, target
    return None


def load_pairs(folder: str | Path | None = None) -> list[dict[str, str]]:
    """All clean pairs as ``{"source", "target"}``, one per English headword (ignoring case), sorted.

    Raises:
        DataNotInstalledError: the dictionary files are missing.
    """
    pairs: dict[str, tuple[str, str]] = {}
    for headword, text in read_entries(folder):
        if headword.startswith("00database"):  # dictd's metadata records, not entries
            continue
        pair = parse_entry(text)
        if pair is not None:
            pairs.setdefault(pair[0].casefold(), pair)
    return [{"source": s, "target": t} for s, t in sorted(pairs.values())]


@register_dataset("freedict_eng_fra")
def load_freedict(data: DataConfig, folder: str | Path | None = None) -> dict[str, list[dict[str, Any]]]:
    """Train / validation / test translation examples for ``data.name: freedict_eng_fra``.

    Args:
        data: The run's data section; ``data.split`` (seed, validation and test fractions) picks the split.
        folder: Where the dictd files are (default ``/usr/share/dictd``).

    Returns:
        Splits of ``{"source", "target", "prompt", "response"}`` examples (see the module docstring).

    Raises:
        DataNotInstalledError: the Debian package is not installed.
    """
    examples = [
        dict(pair, prompt=PROMPT_TEMPLATE.format(source=pair["source"]), response=pair["target"])
        for pair in load_pairs(folder)
    ]
    split = data.split
    random.Random(split.seed).shuffle(examples)
    n_test, n_val = int(len(examples) * split.test), int(len(examples) * split.validation)
    return {
        "train": examples[n_test + n_val :],
        "validation": examples[n_test : n_test + n_val],
        "test": examples[:n_test],
    }


def _clean(text: str) -> str:
    text = unicodedata.normalize("NFC", text).translate(_HYPHENS)
    text = _ASIDE.sub("", text)
    text = text.replace("[", "").replace("]", "").replace("(", "").replace(")", "")
    return " ".join(text.split())

"""Field checks that method configs share, each returning problem lines in one wording.

A config's ``problems()`` collects every problem before raising (STYLE rule 6), so these return lists
(empty when the fields are fine) instead of raising. One wording everywhere also means a user who
mistypes two methods' fields reads the same sentence twice. ``bool`` is refused where a number is
expected: ``True`` is an ``int`` to Python, and ``r: true`` in YAML is a mistake, not a rank of 1.
"""

from __future__ import annotations

import math
from typing import Any


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def booleans(config: Any, *names: str) -> list[str]:
    """``name: must be True or False`` for each named field that is not a bool."""
    return [
        f"{name}: must be True or False, got {getattr(config, name)!r}"
        for name in names
        if not isinstance(getattr(config, name), bool)
    ]


def positive_ints(config: Any, *names: str) -> list[str]:
    """``name: must be a positive integer`` for each named field that is not one."""
    out = []
    for name in names:
        value = getattr(config, name)
        if not _integer(value) or value <= 0:
            out.append(f"{name}: must be a positive integer, got {value!r}")
    return out


def seeds(config: Any, *names: str) -> list[str]:
    """``name: must be an integer seed`` for each named field that is not an integer."""
    return [
        f"{name}: must be an integer seed, got {getattr(config, name)!r}"
        for name in names
        if not _integer(getattr(config, name))
    ]


def dropout(config: Any, name: str) -> list[str]:
    """``name: must be in [0, 1)`` unless the field is a probability below 1."""
    value = getattr(config, name)
    if _number(value) and 0 <= value < 1:
        return []
    return [f"{name}: must be in [0, 1), got {value!r}"]


def finite(config: Any, name: str, hint: str = "") -> list[str]:
    """``name: must be a finite number (hint)``; ``hint`` says what values are usual."""
    value = getattr(config, name)
    if _number(value) and math.isfinite(value):
        return []
    return [f"{name}: must be a finite number{f' ({hint})' if hint else ''}, got {value!r}"]


def bias_mode(config: Any, own: str) -> list[str]:
    """The interchange format's ``bias`` field: ``'none'``, ``'all'`` or the method's ``own`` mode."""
    if config.bias in ("none", "all", own):
        return []
    return [f"bias: must be 'none', 'all' or '{own}', got {config.bias!r}"]


__all__ = ["bias_mode", "booleans", "dropout", "finite", "positive_ints", "seeds"]

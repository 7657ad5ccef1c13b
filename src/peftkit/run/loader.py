"""YAML to nested dataclasses, with every problem found at once, each headed by its field path.

The annotations of the dataclasses are the schema: :func:`load_dataclass` walks a parsed YAML mapping
against them, converts what fits (an int where a float is annotated, ``1e3`` where an int is), and for
everything else appends a problem such as ``train.lr: expected a number, got 'fast' (str)`` or
``data.nmae: unknown key; did you mean 'name'?``. A field that fails keeps its default, so the checks
that come after (ranges, cross-section rules) still run on the rest and the user sees every problem in
one go. A field with a shape of its own (the run config's ``adapter``, whose keys depend on the method)
is handed to a checker the caller names by its path.

Hand-written on purpose: dacite stops at the first error; pydantic reports every error with its
location, but in its own words (docs and tests quote these) and as one more dependency, for what is
about a hundred lines of coercion here.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
# A field's own checker: (the raw value, the problem list to append to) -> the value to build with.
FieldChecker = Callable[[Any, list[str]], Any]


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; configs expect it to be the number 0.001."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """``text`` as YAML, with ``1e-3``-style numbers read as floats."""
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str], problems: list[str]) -> dict[str, Any]:
    """A deep copy of ``data`` with each ``dotted.key=value`` set (malformed overrides go to ``problems``)."""
    out = _deep_copy(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"override {item!r}: expected KEY=VALUE with a dotted key, e.g. train.lr=1e-3")
            continue
        try:
            value = parse_yaml(text) if text.strip() else None
        except yaml.YAMLError:
            value = text  # not YAML (e.g. an unbalanced bracket): keep the text as given
        parts = key.split(".")
        node = out
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                problems.append(f"override {item!r}: {where} is {show(child)}, not a section with keys")
                break
            node = child
        else:
            node[parts[-1]] = value
    return out


def _deep_copy(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def load_dataclass(
    cls: type[T], data: Any, problems: list[str], *, custom: Mapping[str, FieldChecker] | None = None
) -> T:
    """An instance of the dataclass ``cls`` from the mapping ``data``; every problem is appended to
    ``problems`` and the fields it concerns keep their defaults.

    Args:
        cls: A dataclass; fields annotated with dataclasses become nested sections.
        data: A parsed YAML document (a mapping, or anything else, which is a problem).
        problems: Where problems go, each as ``"<field path>: <what is wrong>"``.
        custom: Field path -> the checker of that field (e.g. ``{"adapter": check_adapter}``).
    """
    return _build(cls, _check_dataclass(cls, data, "", problems, custom or {}) or {})


class _Bad:
    """A value that failed its type check (its problem was recorded)."""


_BAD = _Bad()


def _check_dataclass(
    cls: type, data: Any, path: str, problems: list[str], custom: Mapping[str, FieldChecker]
) -> dict[str, Any] | None:
    """Field values of ``cls`` from the mapping ``data``, type-checked; problems are appended."""
    if not isinstance(data, Mapping):
        fields = ", ".join(f.name for f in dataclasses.fields(cls))
        problems.append(f"{path or 'config'}: expected a section of keys ({fields}), got {show(data)}")
        return None
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, Any] = {}
    for key, value in data.items():
        here = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(names)}"
            problems.append(f"{here}: unknown key; {hint}")
        elif here in custom:
            values[key] = custom[here](value, problems)
        elif dataclasses.is_dataclass(hints[key]):
            section = _check_dataclass(hints[key], value, here, problems, custom)
            if section is not None:
                values[key] = section
        else:
            converted, why = coerce(value, hints[key])
            if why:
                problems.append(f"{here}: {why}")
            else:
                values[key] = converted
    return values


def _build(cls: type, values: Mapping[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {
        key: _build(hints[key], value) if dataclasses.is_dataclass(hints[key]) else value
        for key, value in values.items()
    }
    return cls(**kwargs)


def coerce(value: Any, hint: Any) -> tuple[Any, str | None]:
    """``value`` converted to the annotated type ``hint`` (ints widen to floats), or a reason it cannot be."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is object:
        return value, None
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return (None, None) if type(None) in args else (_BAD, f"expected {describe(hint)}, got null")
        for arg in args:
            if arg is not type(None):
                converted, why = coerce(value, arg)
                if why is None:
                    return converted, None
        return _BAD, f"expected {describe(hint)}, got {show(value)}"
    if origin is typing.Literal:
        if value in args:
            return value, None
        return _BAD, f"expected one of {', '.join(map(repr, args))}, got {show(value)}"
    if value is None:
        return _BAD, f"expected {describe(hint)}, got null (leave the key out to keep its default)"
    if hint is bool:
        ok = isinstance(value, bool)
        return (value, None) if ok else (_BAD, f"expected true or false, got {show(value)}")
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # `steps: 1e3`
        ok = isinstance(value, int) and not isinstance(value, bool)
        return (value, None) if ok else (_BAD, f"expected an integer, got {show(value)}")
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return (float(value), None) if ok else (_BAD, f"expected a number, got {show(value)}")
    if hint is str:
        if isinstance(value, bool):  # YAML 1.1 reads bare off/on/no/yes as booleans
            return _BAD, f'expected a string, got {show(value)}: quote the word, e.g. "off" or "no"'
        return (value, None) if isinstance(value, str) else (_BAD, f"expected a string, got {show(value)}")
    if origin in (list, tuple) and args:
        if not isinstance(value, list):
            return _BAD, f"expected {describe(hint)}, got {show(value)}"
        items = [coerce(v, args[0]) for v in value]
        bad = [f"item {i}: {why}" for i, (_, why) in enumerate(items) if why]
        return ([v for v, _ in items], None) if not bad else (_BAD, "; ".join(bad))
    if origin is dict and args:
        if not isinstance(value, Mapping):
            return _BAD, f"expected {describe(hint)}, got {show(value)}"
        out, bad = {}, []
        for k, v in value.items():
            key, why_key = coerce(k, args[0])
            item, why = coerce(v, args[1])
            bad += [f"key {k!r}: {w}" for w in (why_key, why) if w]
            out[key] = item
        return (out, None) if not bad else (_BAD, "; ".join(bad))
    return value, None  # an annotation this checker does not model: the config class validates it


def describe(hint: Any) -> str:
    """The annotated type as a message names it: "an integer", "a list of strings", "a number or null"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {describe(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    if origin is dict:
        return "a mapping" + (
            f" of {describe(args[1]).removeprefix('a ').removeprefix('an ')}s" if args else ""
        )
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def show(value: Any) -> str:
    """A value as a message quotes it: its repr (cut at 60 characters) and its kind."""
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    kind = {dict: "a mapping", list: "a list", type(None): "null"}.get(type(value), type(value).__name__)
    return text if value is None else f"{text} ({kind})"

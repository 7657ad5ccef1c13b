"""The ``adapter:`` section of a run config: ``method`` and that method's own config fields.

Its keys depend on the method, so it is checked by the method's config class (through
:func:`peftkit.make_config`) rather than by a dataclass of its own; every problem comes back with its
``adapter.`` path like the rest of the run config's. ``method: full`` trains every parameter instead of
an adapter and takes no other field; ``target_modules: auto`` leaves the targets to ``peftkit.select``.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from collections.abc import Mapping
from typing import Any

from ..core import registry
from ..core.registry import DEFAULT_METHOD, FULL_FINE_TUNING
from ..errors import ConfigError
from ..select.choose import AUTO
from .loader import coerce, show

# Learning rates `peftkit compare` tries for full fine-tuning (a method's own live on its config class,
# ``lr_candidates``): published BERT-size runs use 1e-5 to 5e-5 over epochs; short budgets need more.
FULL_FINE_TUNING_LR_CANDIDATES = (3e-5, 1e-4, 3e-4)


def method_name(adapter: Any) -> str:
    """The method an ``adapter`` section names, lower-cased (the default method when it names none;
    "" when the section is not a mapping)."""
    return str(adapter.get("method", DEFAULT_METHOD)).lower() if isinstance(adapter, Mapping) else ""


def check_adapter(section: Any, problems: list[str]) -> dict[str, Any]:
    """The adapter section: ``method`` plus the method's own fields, checked by the method's config."""
    if not isinstance(section, Mapping):
        problems.append(
            f"adapter: expected a section with `method` and that method's fields, got {show(section)}"
        )
        return {"method": DEFAULT_METHOD}
    fields = dict(section)
    method = fields.pop("method", DEFAULT_METHOD)
    if not isinstance(method, str):
        problems.append(
            f"adapter.method: expected a method name such as {DEFAULT_METHOD!r}, got {show(method)}"
        )
        return dict(section)
    if method.lower() == FULL_FINE_TUNING:
        problems += [
            f"adapter.{key}: `method: full` trains every parameter and takes no other field; "
            "remove it, or choose an adapter method"
            for key in fields
        ]
        return {"method": FULL_FINE_TUNING}
    problems += data_init_problems(method, fields)
    if fields.get("target_modules") == AUTO:
        # chosen by `select` before training; the rest of the section must be a valid config of the method
        spec = _find(method)
        if spec is not None and not spec.config_cls.selectable:
            able = registry.methods_with("selectable")
            switch = f", or switch to {able[0]}" if able else ""
            problems.append(
                f"adapter.target_modules: `auto` chooses targets and ranks with peftkit.select, so it needs "
                f"method: {' or '.join(able) or 'one that declares selectable'} (got {method!r}); name the "
                f"targets for {method}{switch}"
            )
            return {"method": method, **fields}
        problems += adapter_problems(method, {k: v for k, v in fields.items() if k != "target_modules"})
        return {"method": method, **fields}
    problems += adapter_problems(method, fields)
    return {"method": method, **fields}


def data_init_problems(method: str, fields: Mapping[str, Any]) -> list[str]:
    """An init that starts from the run's data (LoRA's EVA and CorDA: ``data_inits`` on the config class)
    named for a method without it, or beside ``target_modules: auto`` (which chooses ranks and A itself)."""
    init = fields.get("init_lora_weights")
    if not isinstance(init, str):
        return []
    able = [
        m
        for m in registry.methods_with("data_inits")
        if init in registry.find_method(m).config_cls.data_inits
    ]
    if not able:
        return []
    if method.lower() not in able:
        return [
            f"adapter.init_lora_weights: {init!r} starts {' or '.join(able)} from the run's training data; "
            f"method {method!r} has no such init: set adapter.method: {able[0]} (or drop init_lora_weights)"
        ]
    if fields.get("target_modules") == AUTO:
        return [
            f"adapter.init_lora_weights: {init!r} starts the adapter from the data itself, and "
            "`target_modules: auto` chooses targets, ranks and A from its own probe; name the targets "
            f"(e.g. all-linear) for {init}, or drop init_lora_weights for the selection"
        ]
    return []


def _find(method: str) -> registry.MethodSpec | None:
    try:
        return registry.find_method(method)
    except KeyError:  # adapter_problems says so, with the close names
        return None


def adapter_problems(method: str, fields: Mapping[str, Any]) -> list[str]:
    """Every problem of ``adapter: {method: ..., **fields}``, each with its ``adapter.`` path."""
    from ..api import make_config

    try:
        config_cls = registry.find_method(method).config_cls
    except KeyError as exc:
        return [f"adapter.method: {exc.args[0]}, or 'full' for full fine-tuning"]
    try:
        hints = typing.get_type_hints(config_cls)
    except (NameError, TypeError):  # annotations naming types only imported for type checkers
        hints = {}
    names = [f.name for f in dataclasses.fields(config_cls) if f.init]
    out: list[str] = []
    known: dict[str, Any] = {}
    for key, value in fields.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else f"its fields are: {', '.join(sorted(names))}"
            out.append(f"adapter.{key}: {config_cls.__name__} has no field {key!r}; {hint}")
            continue
        converted, why = coerce(value, hints.get(key, Any))
        if why:
            out.append(f"adapter.{key}: {why}")
        else:
            known[key] = converted
    try:  # with the well-typed fields only: the method's own checks assume them
        make_config(method, **known)
    except ConfigError as exc:
        out += [_prefixed(p, names) for p in exc.problems]
    except (TypeError, ValueError) as exc:  # a check the config class does without ConfigError
        out.append(f"adapter: {config_cls.__name__} refused these fields: {exc}")
    return out


def _prefixed(problem: str, names: list[str]) -> str:
    """``adapter.<field>: ...`` for a method problem that starts with one of its field names."""
    head = re.match(r"([A-Za-z_][\w]*)", problem)
    if head and head.group(1) in names:
        return f"adapter.{problem}"
    return f"adapter: {problem}"


def lr_candidates(adapter: dict[str, Any]) -> tuple[float, ...]:
    """The learning rates worth trying for the method of an ``adapter`` section (its registry entry's).

    Raises:
        ConfigError: the method is unknown.
    """
    method = str(adapter.get("method", DEFAULT_METHOD))
    if method.lower() == FULL_FINE_TUNING:
        return FULL_FINE_TUNING_LR_CANDIDATES
    try:
        return tuple(registry.find_method(method).config_cls.lr_candidates)
    except KeyError as exc:
        raise ConfigError([f"adapter.method: {exc.args[0]}"], what="run config") from None

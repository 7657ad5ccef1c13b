"""Where methods and layer kinds add themselves.

A method file calls :func:`register_method` on its config class and :func:`register_layer` once per
kind of base layer it can wrap. Dispatch is a first-match table per method (STYLE.md rule 5): a
quantized backend adds its own rows in front with ``first=True`` from an import-guarded module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

Predicate = Callable[[nn.Module], "str | None"]
"""Returns None when the module is supported, else a short reason why it is not."""


@dataclass
class LayerRow:
    """One row of a method's dispatch table."""

    kind: str  # human name shown in summaries and errors, e.g. "Linear"
    base_types: tuple[type, ...]
    build: Callable[..., nn.Module]  # (base_layer, **plain values) -> per-adapter module
    check: Predicate | None = None  # extra configuration check on a module of a matching type


@dataclass
class MethodSpec:
    peft_type: str
    config_cls: type
    rows: list[LayerRow] = field(default_factory=list)


_METHODS: dict[str, MethodSpec] = {}
_BUILTINS_LOADED = False


def _load_builtin_methods() -> None:
    # `import peftkit` is lazy (so `peftkit --help` stays fast), so the built-in methods may not have
    # registered themselves yet when a lookup comes; importing the package registers them all.
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        import importlib

        importlib.import_module("peftkit.methods")


def register_method(peft_type: str) -> Callable[[type], type]:
    """Class decorator for a method's config dataclass; ``peft_type`` is the interchange name (e.g. "LORA")."""

    def decorate(config_cls: type) -> type:
        spec = _METHODS.get(peft_type)
        if spec is None:
            _METHODS[peft_type] = MethodSpec(peft_type, config_cls)
        else:
            spec.config_cls = config_cls
        config_cls.peft_type = peft_type
        return config_cls

    return decorate


def register_layer(
    peft_type: str,
    kind: str,
    base_types: tuple[type, ...],
    build: Callable[..., nn.Module],
    check: Predicate | None = None,
    first: bool = False,
) -> None:
    """Add a dispatch row: modules of ``base_types`` (passing ``check``) are adapted by ``build``."""
    spec = _METHODS.setdefault(peft_type, MethodSpec(peft_type, object))
    row = LayerRow(kind, base_types, build, check)
    if first:
        spec.rows.insert(0, row)
    else:
        spec.rows.append(row)


def method(peft_type: str) -> MethodSpec:
    if peft_type not in _METHODS:
        _load_builtin_methods()
    try:
        return _METHODS[peft_type]
    except KeyError:
        known = ", ".join(sorted(_METHODS)) or "none"
        raise KeyError(f"no PEFT method registered as {peft_type!r}; registered: {known}") from None


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def find_method(name: str) -> MethodSpec:
    """The method called ``name``, spelled as its interchange type in any case, with or without
    ``-``/``_`` ("lora", "LORA", "prefix-tuning", "ln_tuning" ...)."""
    _load_builtin_methods()
    by_key = {_key(t): spec for t, spec in _METHODS.items()}
    spec = by_key.get(_key(name)) if isinstance(name, str) else None
    if spec is None:
        import difflib

        close = difflib.get_close_matches(_key(str(name)), list(by_key), n=1)
        hint = f"; did you mean {by_key[close[0]].peft_type.lower()!r}?" if close else ""
        known = ", ".join(t.lower() for t in sorted(_METHODS))
        raise KeyError(f"unknown PEFT method {name!r}{hint} Known methods: {known}")
    return spec


def registered_methods() -> list[str]:
    _load_builtin_methods()
    return sorted(_METHODS)


def dispatch(peft_type: str, module: nn.Module) -> tuple[LayerRow | None, str | None]:
    """First matching row for ``module``, or (None, reason) explaining why it cannot be adapted."""
    reason = None
    for row in method(peft_type).rows:
        if isinstance(module, row.base_types):
            problem = row.check(module) if row.check else None
            if problem is None:
                return row, None
            reason = problem
    if reason is None:
        reason = f"type {type(module).__name__} is not supported"  # the caller lists what is
    return None, reason


def supported_kinds(peft_type: str) -> str:
    seen: list[str] = []
    for row in method(peft_type).rows:
        for t in row.base_types:
            label = f"{t.__module__.split('.')[0]}.{t.__qualname__}" if t.__module__ else t.__qualname__
            label = label.replace("torch.", "torch.nn.", 1) if label.startswith("torch.") else label
            if label not in seen:
                seen.append(label)
    return ", ".join(seen)


def config_class(peft_type: str) -> Any:
    return method(peft_type).config_cls

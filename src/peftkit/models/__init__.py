"""Pretrained models that ship inside packages, by name ("minilm", "smollm2-135m-instruct", ...).

Each module here registers one bundled model with :func:`register_model`; every module is imported,
so adding a model touches one file. ``ModelConfig.name_or_path`` may name one of them; anything else
is a local directory or a hub id.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

_MODELS: dict[str, Callable[[], str]] = {}


def register_model(name: str) -> Callable[[Callable[[], str]], Callable[[], str]]:
    """Decorator for a function returning the bundled model's local path (a model directory, or a
    weights file for non-transformers models); it raises ``DataNotInstalledError`` naming the pip or
    apt command when the package is missing."""

    def decorate(locate: Callable[[], str]) -> Callable[[], str]:
        _MODELS[name] = locate
        return locate

    return decorate


def bundled_models() -> list[str]:
    return sorted(_MODELS)


def bundled_model_path(name: str) -> str | None:
    """The local path of bundled model ``name``, or None when ``name`` is not a bundled model."""
    locate = _MODELS.get(name.lower())
    return None if locate is None else locate()


for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")

"""Pretrained models that ship inside packages, by name ("minilm", "smollm2-135m-instruct", ...).

Each module here registers one bundled model with :func:`register_model`; every module is imported,
so adding a model touches one file. ``ModelConfig.name_or_path`` may name one of them; anything else
is a local directory or a hub id.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
from collections.abc import Callable, Iterator

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


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' warnings at error level and its progress bars off; both restored afterwards.

    Loading a model for a new task makes transformers report the fresh head's weights as newly
    initialised and draw a bar per model, and generate() warns about defaults it overrides: in a
    training run's output that is noise, since the head is meant to be new."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


@contextlib.contextmanager
def explain_missing(name: str) -> Iterator[None]:
    """Turn a loader's OSError into one that says which names are bundled and that the hub needs a network."""
    try:
        yield
    except OSError as exc:
        raise OSError(
            f"model.name_or_path {name!r} is not a bundled model ({', '.join(bundled_models())}), and loading "
            f"it as a local directory or hub id failed (the hub needs a network): {exc}"
        ) from exc


for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")

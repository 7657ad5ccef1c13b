"""Pretrained models that ship inside packages, by name ("minilm", "smollm2-135m-instruct", ...).

Each module here registers one bundled model with :func:`register_model`; every module is imported,
so adding a model touches one file. ``ModelConfig.name_or_path`` may name one of them; anything else
is a local directory or a hub id.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import pkgutil
import re
from collections.abc import Callable, Iterator
from pathlib import Path

_MODELS: dict[str, Callable[[], str]] = {}
_HUB_IDS: dict[str, str] = {}


def register_model(name: str, hub_id: str | None = None) -> Callable[[Callable[[], str]], Callable[[], str]]:
    """Decorator for a function returning the bundled model's local path (a model directory, or a
    weights file for non-transformers models); it raises ``DataNotInstalledError`` naming the pip or
    apt command when the package is missing. ``hub_id`` is where the same weights live on the hub."""

    def decorate(locate: Callable[[], str]) -> Callable[[], str]:
        _MODELS[name] = locate
        if hub_id:
            _HUB_IDS[name] = hub_id
        return locate

    return decorate


def portable_name(name_or_path: str) -> str:
    """How a saved adapter should name its base model for others: a bundled model's hub id (or its bundled
    name when it has none) instead of a path into this machine's site-packages; anything else as given."""
    key = name_or_path.lower()
    if key in _MODELS:
        return _HUB_IDS.get(key, key)
    return name_or_path


def bundled_name(name_or_path: str) -> str | None:
    """The bundled model a saved adapter's ``base_model_name_or_path`` names (its bundled name, or the hub
    id :func:`portable_name` records for it), or None."""
    key = name_or_path.lower()
    if key in _MODELS:
        return key
    return next((name for name, hub in _HUB_IDS.items() if hub.lower() == key), None)


def bundled_models() -> list[str]:
    return sorted(_MODELS)


def bundled_model_path(name: str) -> str | None:
    """The local path of bundled model ``name``, or None when ``name`` is not a bundled model."""
    locate = _MODELS.get(name.lower())
    return None if locate is None else locate()


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")  # files a task may load directly
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def source_problem(name: str, gguf_file: str | None = None) -> str | None:
    """What is wrong with ``name`` as a model to load (None when it looks loadable), said before any
    loader runs, so a mistyped path gets a plain answer instead of the hub's complaint about repo ids.

    A bundled name, an existing model directory (with config.json, or a GGUF checkpoint), a weights file
    and a hub id (``org/name``, where nothing local of that name exists) pass.
    """
    if name.lower() in _MODELS:
        return None
    local = Path(name).expanduser()
    if local.is_file():
        if local.suffix in WEIGHT_SUFFIXES:
            return None
        return (
            f"{name!r} is a file, not a model directory; give the directory the model was saved to (the one "
            "holding config.json), a bundled model or a hub id"
        )
    if local.is_dir():
        if (local / "config.json").is_file() or gguf_file or any(local.glob("*.gguf")):
            return None
        return (
            f"{name!r} is not a model directory (no config.json in it); give the directory save_pretrained "
            "wrote, a bundled model or a hub id"
        )
    parts = Path(name).parts
    surely_a_path = (
        name.startswith(("/", ".", "~"))
        or len(parts) > 2
        or local.suffix in WEIGHT_SUFFIXES
        or (len(parts) == 2 and Path(parts[0]).expanduser().is_dir())
    )
    if surely_a_path:
        return f"{name!r} does not exist (relative paths start from {str(Path.cwd())!r})"
    if _HUB_ID.fullmatch(name):
        return None  # a hub id: downloaded at load time where a network exists
    close = difflib.get_close_matches(name.lower(), list(_MODELS), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return (
        f"{name!r} is not a bundled model ({', '.join(bundled_models())}), an existing local path or a hub id "
        f"('org/name'); {hint}"
    )


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

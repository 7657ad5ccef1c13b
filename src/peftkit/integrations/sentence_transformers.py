"""sentence-transformers: peftkit adapters on a ``SentenceTransformer`` (docs/integrations.md).

Adapt the transformers model inside it, ``model.transformers_model`` (the ``Transformer`` module's
``auto_model``), and train with ``SentenceTransformerTrainer`` and any of its losses as usual: the
optimizer holds the adapter's parameters only. ``model.save(directory)``, ``trainer.save_model`` and
every checkpoint then write sentence-transformers' own directory layout with the adapter
(``adapter_config.json`` + ``adapter_model.safetensors``) where the transformer's weights would be,
because ``peftkit.inject`` gave that model an adapter-aware ``save_pretrained``. That is the layout
sentence-transformers writes for the reference library's adapters, and ``SentenceTransformer(directory)``
reads it, through the reference library.

What this module adds:

* :func:`load` reads such a directory *without* the reference library: the base model's weights with
  the saved modules, tokenizer and settings, and the adapter loaded by peftkit;
* :class:`PeftkitSentenceTransformerTrainer` resumes from its checkpoints and loads the best one at the
  end. ``SentenceTransformerTrainer`` reloads a whole model from the checkpoint and copies its state
  dict, which for an adapter needs the reference library and its parameter names: resuming fails,
  and ``load_best_model_at_end`` only logs an error and keeps the last model;
* :func:`check_model` refuses adapters that ``model.save`` would not write as an adapter (an adapter
  put on the ``SentenceTransformer`` as a whole, or on a module that is not its transformers model).

Importing this module imports sentence-transformers; ``import peftkit`` does not.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer

from ..api import load_adapter
from ..core import pretrained
from ..core.inject import is_adapted
from ..core.io import CONFIG_NAME, read_adapter_config
from ..errors import AdapterNameError, ConfigError
from .transformers_trainer import check_model as check_trainer_model

__all__ = ["PeftkitSentenceTransformerTrainer", "check_model", "load", "transformer_directory"]

# Files of an adapter directory (the interchange format), left out when the base model's weights are shown
# to sentence-transformers in their place.
ADAPTER_FILES = {CONFIG_NAME, "adapter_model.safetensors", "adapter_model.bin"}
# Files of a transformers model directory that carry its architecture and weights (not its tokenizer).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


def check_model(model: SentenceTransformer) -> SentenceTransformer:
    """Check that ``model``'s adapters sit on its transformers model, where ``model.save`` writes them as
    an adapter, and that a ``Trainer`` can train them; returns ``model``.

    Raises:
        AdapterNameError: ``model.transformers_model`` holds no peftkit adapters.
        ConfigError: adapters were injected into the ``SentenceTransformer`` as a whole or into another of
            its modules (``model.save`` would refuse or write base weights under adapter names), or an
            adapter needs a per-step hook (AdaLoRA). The message names the fix.
    """
    inner = model.transformers_model
    if is_adapted(model) or (
        inner is not None
        and any(pretrained.holds_adapters(m) for m in model.children() if inner not in set(m.modules()))
    ):
        raise ConfigError(
            [
                "the adapters were injected into the SentenceTransformer itself (or into a module other than its "
                "transformers model), which model.save cannot write as an adapter: peftkit.unload(model), then "
                "peftkit.inject(model.transformers_model, config)"
            ],
            what="SentenceTransformer model",
        )
    if not is_adapted(inner):
        raise AdapterNameError(
            "this SentenceTransformer's transformers model holds no peftkit adapters: call "
            "peftkit.inject(model.transformers_model, config) first"
        )
    check_trainer_model(inner)
    return model


def transformer_directory(directory: str | os.PathLike) -> Path:
    """The folder of a saved ``SentenceTransformer`` that holds its transformer (the adapter, when one was
    trained), read from its ``modules.json``.

    Raises:
        FileNotFoundError: ``directory`` has no ``modules.json`` (it is not a sentence-transformers directory).
        ValueError: no module in ``modules.json`` is a ``Transformer``.
    """
    modules_json = Path(directory) / "modules.json"
    if not modules_json.is_file():
        raise FileNotFoundError(
            f"no modules.json in {str(directory)!r}: not a directory SentenceTransformer.save wrote"
        )
    modules = json.loads(modules_json.read_text(encoding="utf8"))
    for entry in modules:
        if entry.get("type", "").rsplit(".", 1)[-1] == "Transformer":
            return Path(directory) / entry.get("path", "")
    raise ValueError(f"{str(modules_json)!r} lists no Transformer module: {[e.get('type') for e in modules]}")


def load(
    directory: str | os.PathLike,
    base: str | os.PathLike | None = None,
    *,
    is_trainable: bool = False,
    **kwargs: Any,
) -> SentenceTransformer:
    """Load a ``SentenceTransformer`` saved with a peftkit adapter (``model.save``, ``trainer.save_model`` or
    a checkpoint), with peftkit and without the reference library.

    Args:
        directory: What ``SentenceTransformer.save`` wrote.
        base: The transformers model the adapter was trained on (a directory, a bundled model name or a hub
            id); default: the adapter's ``base_model_name_or_path``.
        is_trainable: Load the adapter to train it further (its parameters require grad).
        kwargs: Passed to ``SentenceTransformer`` (``device``, ``model_kwargs`` ...).

    Returns:
        The model: the saved modules and settings, the base weights, the adapter active.

    Raises:
        FileNotFoundError: ``directory`` is not a sentence-transformers directory, or its transformer folder
            holds no adapter.
        ValueError: ``base`` is not given and the adapter does not name a base model directory.
    """
    folder = transformer_directory(directory)
    config = read_adapter_config(folder)
    base_dir = _base_directory(base if base is not None else config.base_model_name_or_path)
    with tempfile.TemporaryDirectory(prefix="peftkit-st-") as overlay:
        _overlay(Path(directory), folder, base_dir, Path(overlay))
        model = SentenceTransformer(overlay, **kwargs)
    inner_model = model.transformers_model
    inner_model.config._name_or_path = str(base if base is not None else config.base_model_name_or_path)
    load_adapter(inner_model, folder, is_trainable=is_trainable)
    return model


def _base_directory(name: str | os.PathLike | None) -> Path:
    from ..models import bundled_model_path

    if not name:
        raise ValueError("the adapter names no base model (base_model_name_or_path is empty): pass base=")
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    bundled = bundled_model_path(str(name))
    if bundled is not None:
        return Path(bundled)
    from huggingface_hub import snapshot_download

    # A hub id: the weights and config only (from the local cache when offline).
    return Path(snapshot_download(str(name), allow_patterns=["config.json", "*.safetensors", "*.json"]))


def _overlay(directory: Path, folder: Path, base_dir: Path, overlay: Path) -> None:
    """Fill ``overlay`` with links making it the saved directory as it would be with the base model's weights
    in place of the adapter: sentence-transformers then reads the saved modules, tokenizer and settings, and
    transformers the base weights, each through its own loader."""
    for path in directory.rglob("*"):
        if path.is_dir() or (path.parent == folder and path.name in ADAPTER_FILES):
            continue
        link = overlay / path.relative_to(directory)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path.resolve())
    inner = overlay / folder.relative_to(directory)
    inner.mkdir(parents=True, exist_ok=True)
    for path in base_dir.iterdir():
        weights = path.name == "config.json" or path.name.endswith(WEIGHT_SUFFIXES)
        if path.is_file() and weights and not (inner / path.name).exists():
            (inner / path.name).symlink_to(path.resolve())


class PeftkitSentenceTransformerTrainer(SentenceTransformerTrainer):
    """``SentenceTransformerTrainer`` for a model whose transformer holds peftkit adapters: the model is
    checked (:func:`check_model`) and ``resume_from_checkpoint`` and ``load_best_model_at_end`` copy the
    checkpoint's adapter into the live one (in place: the optimizer keeps its parameters). Saving is
    sentence-transformers' own. Takes ``SentenceTransformerTrainer``'s arguments."""

    def __init__(self, model: SentenceTransformer | None = None, *args: Any, **kwargs: Any) -> None:
        if model is not None:
            check_model(model)
        super().__init__(model, *args, **kwargs)

    def _load_from_checkpoint(self, checkpoint_path: str, *args: Any) -> None:
        model = getattr(self.model, "_orig_mod", self.model)
        pretrained.load_saved_adapters(model.transformers_model, transformer_directory(checkpoint_path))

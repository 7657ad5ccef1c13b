"""Bundled real data sets by name ("rotten_tomatoes", "freedict_eng_fra", "fashion_mnist").

A data module registers a loader with :func:`register_dataset`; ``DataConfig.name`` selects it.
A loader takes the run's ``DataConfig`` and returns deterministic ``{"train", "validation", "test"}``
lists of examples (mappings whose keys are the task's column roles, e.g. "text" and "label").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

Loader = Callable[[Any], dict[str, Sequence[dict[str, Any]]]]
_DATASETS: dict[str, Loader] = {}


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    def decorate(loader: Loader) -> Loader:
        _DATASETS[name] = loader
        return loader

    return decorate


def bundled_datasets() -> list[str]:
    return sorted(_DATASETS)


def dataset_loader(name: str) -> Loader:
    try:
        return _DATASETS[name]
    except KeyError:
        known = ", ".join(sorted(_DATASETS)) or "none"
        raise KeyError(f"unknown bundled data set {name!r}; bundled: {known} (or give data.files)") from None

"""The base model a server holds: where it comes from, what it does (generate or classify), its tokenizer.

``BASE`` is a run directory (its task, model and tokenizer; its adapter becomes the first served adapter)
or what ``model.name_or_path`` accepts (a bundled model's name, a local directory, a hub id) with a task.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..models.config import ModelConfig
from ..run.config import load_config
from ..run.runner import CONFIG_NAME, build_task, is_full_fine_tuning, load_run, weights_dir
from ..tasks import task_class

GENERATE, CLASSIFY = "generate", "classify"
KINDS = {"causal-lm": GENERATE, "text-classification": CLASSIFY}
FALLBACK_CONTEXT = 2048  # tokens, when the model's config does not say how many positions it reads


@dataclass
class ServedBase:
    """The loaded base: what clients call it, what it does, and what requests are encoded with.

    Attributes:
        id: The ``model`` value that means "no adapter".
        kind: ``generate`` (completions, chat) or ``classify``.
        source: Where it came from (shown in ``/v1/models`` as ``root``).
        model: The base in eval mode (adapters are added to it as they load).
        task: The peftkit task that encodes inputs (chat template, system prompt, labels).
        tokenizer: The task's tokenizer.
        labels: Class names in head order (classify only).
        context: How many token positions the model reads.
        adapter: ``(name, directory)`` of the run's own adapter when ``BASE`` is a run directory.
    """

    id: str
    kind: str
    source: str
    model: nn.Module
    task: Any
    tokenizer: Any
    labels: list[str] | None = None
    context: int = FALLBACK_CONTEXT
    adapter: tuple[str, Path] | None = None
    stop_ids: list[int] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Token ids of a conversation up to where the assistant's answer starts (the run's template)."""
        return self.task.encode_prompt({"messages": list(messages)})

    def encode_text(self, text: str) -> list[int]:
        """Token ids of a raw completion prompt (with the BOS the tokenizer adds)."""
        return list(self.tokenizer(text)["input_ids"])


def load_base(source: str, *, task: str | None = None, name: str | None = None) -> ServedBase:
    """Load the base of ``peftkit serve SOURCE``.

    Raises:
        ConfigError: the task cannot be served, or ``task`` contradicts the run's.
        FileNotFoundError: a run directory without weights, or a model that cannot be found.
    """
    path = Path(source)
    if (path / CONFIG_NAME).is_file():
        return _from_run(path, task, name)
    if path.is_file():
        raise ConfigError(
            [f"BASE: {source!r} is a file; give a run directory, a model directory or a bundled model name"],
            what="serve",
        )
    kind_task = task or "causal-lm"
    _check_task(kind_task, "--task")
    built = task_class(kind_task)(model=ModelConfig(name_or_path=source))
    model = built.load_model().eval()
    return _served(name or source, source, kind_task, built, model)


def _from_run(run_dir: Path, task: str | None, name: str | None) -> ServedBase:
    config = load_config(run_dir / CONFIG_NAME)
    _check_task(config.task, "the run's task")
    if task and task != config.task:
        raise ConfigError(
            [f"--task {task}: the run in {str(run_dir)!r} is a {config.task} run; leave --task out"],
            what="serve",
        )
    base_id = name or str(config.model.name_or_path)
    if is_full_fine_tuning(config):  # the fine-tuned model is the base; there is no adapter to route
        loaded = load_run(run_dir)
        return _served(name or run_dir.name, str(run_dir), config.task, loaded.task, loaded.model, run_dir)
    built = build_task(config)
    model = built.load_model().eval()
    served = _served(base_id, str(config.model.name_or_path), config.task, built, model, run_dir)
    served.adapter = (run_dir.name, weights_dir(run_dir, full=False))
    return served


def _check_task(task: str, where: str) -> None:
    if task not in KINDS:
        raise ConfigError(
            [
                f"{where}: peftkit serve serves {' and '.join(KINDS)} models, not {task!r}; use "
                "`peftkit predict` for it"
            ],
            what="serve",
        )


def _served(
    base_id: str, source: str, task_name: str, task: Any, model: nn.Module, run_dir: Path | None = None
) -> ServedBase:
    kind = KINDS[task_name]
    tokenizer = task._load_tokenizer(task.model_source()) if kind == CLASSIFY else task._load_tokenizer()
    labels = None
    if kind == CLASSIFY:
        labels = run_labels(run_dir) if run_dir else None
        labels = labels or [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
    context = getattr(model.config, "max_position_embeddings", None) or FALLBACK_CONTEXT
    stops: list[int] = []
    if kind == GENERATE:
        from ..tasks.generation import stop_ids

        stops = list(stop_ids(model, tokenizer) or [])
    return ServedBase(base_id, kind, source, model, task, tokenizer, labels, int(context), None, stops)


def run_labels(run_dir: Path | None) -> list[str] | None:
    """The class names a classification run was trained with (from its metrics.json), if it records them."""
    if run_dir is None:
        return None
    for directory in (run_dir, run_dir.parent):
        metrics = directory / "metrics.json"
        if metrics.is_file():
            try:
                labels = json.loads(metrics.read_text()).get("data", {}).get("labels")
            except (OSError, ValueError, AttributeError):
                return None
            return [str(label) for label in labels] if isinstance(labels, list) else None
    return None


def adapter_directory(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """``(adapter directory, run directory or None)`` for a path naming either.

    Raises:
        FileNotFoundError: nothing there, or neither an adapter nor a run directory (says which files
            were looked for).
    """
    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        return weights_dir(path, full=False), path
    if (path / "adapter_config.json").is_file():
        run = path.parent if (path.parent / CONFIG_NAME).is_file() else None
        return path, run
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist")
    raise FileNotFoundError(
        f"{str(path)!r} holds neither adapter_config.json (an adapter directory) nor {CONFIG_NAME} (a "
        "peftkit run directory)"
    )

"""What a task is: how to load its model and data, batch it, compute its loss, evaluate and predict.

A task module defines a class implementing :class:`Task` and registers it with
:func:`register_task`; the run machinery (``peftkit train`` / ``eval`` / ``predict``) and the training
loop only talk to this interface, so a new task touches one file (as a method does).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn

Example = Mapping[str, Any]  # one record after column mapping, e.g. {"text": ..., "label": 1}
Batch = Mapping[str, Any]  # collated tensors (and anything else the task's loss needs)


class Task(Protocol):
    """One kind of fine-tuning job. Instances are built from the run-config sections the task reads,
    named in ``sections`` and passed as keywords: ``TextClassificationTask(model=..., data=..., ...)``;
    never the whole run config (its ``select`` and ``output_dir`` are the runner's business).

    The lifecycle: ``load_model()`` (model, plus tokenizer/processor kept on the task) ->
    ``load_data()`` -> ``collate`` batches for ``loss`` during training -> ``evaluate`` on a split ->
    ``predict`` on raw inputs.
    """

    name: str
    # the RunConfig sections the constructor takes as keywords, e.g. ("model", "data", "eval", "train")
    sections: tuple[str, ...]
    default_metric: str  # the metric that picks the best checkpoint ("accuracy", "chrf", ...)
    input_role: str  # what predict reads from a mapping input ("text", "prompt", "image", "source")
    greater_is_better: bool

    def load_model(self) -> nn.Module:
        """The base model (before any adapter), on CPU, in the configured dtype."""
        ...

    def load_data(self) -> dict[str, Sequence[Example]]:
        """Deterministic "train", "validation" and "test" splits (a split may be empty)."""
        ...

    def collate(self, examples: Sequence[Example]) -> Batch:
        """Tensors for one batch of training examples."""
        ...

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The scalar training loss of ``model`` on ``batch``."""
        ...

    def evaluate(self, model: nn.Module, examples: Sequence[Example], batch_size: int) -> dict[str, float]:
        """Metrics of ``model`` (in eval mode, no grad) on ``examples``; includes ``"loss"``."""
        ...

    def predict(self, model: nn.Module, inputs: Sequence[Any], batch_size: int) -> list[Any]:
        """Predictions for raw inputs (texts, prompts, images); JSON-serialisable values."""
        ...

    # Optional: ``behaviour_probe(model, n, batch_size) -> peftkit.tasks.probes.BehaviourProbe``, the
    # model's behaviour on ``n`` held-out general inputs; ``peftkit compare`` measures forgetting with
    # it and reports "n/a" for a task without one.


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (dropout off) and no gradients; the model's training mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def majority_baseline(
    splits: Mapping[str, Sequence[Example]],
    label_id: Callable[[Any], int],
    metric_fns: Mapping[str, Callable[..., float]],
) -> dict[str, Any] | None:
    """What predicting the training split's most frequent class scores on the test split (the validation
    split when there is no test split), for a classification task; None without the splits."""
    from .. import metrics

    held_out = splits.get("test") or splits.get("validation") or []
    if not splits.get("train") or not held_out:
        return None
    scores = metrics.majority_class(
        [label_id(e["label"]) for e in splits["train"]],
        [label_id(e["label"]) for e in held_out],
        dict(metric_fns),
    )
    return {"name": "majority class", "split": "test" if splits.get("test") else "validation", **scores}


_TASKS: dict[str, Callable[..., Task]] = {}


def register_task(name: str) -> Callable[[type], type]:
    """Class decorator: make a task available as ``task: <name>`` in run configs."""

    def decorate(cls: type) -> type:
        cls.name = name
        _TASKS[name] = cls
        return cls

    return decorate


def task_class(name: str) -> Callable[..., Task]:
    try:
        return _TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(sorted(_TASKS)) or 'none'}") from None


def registered_tasks() -> list[str]:
    return sorted(_TASKS)

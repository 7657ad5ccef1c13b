"""What the classification tasks (text, image) share: the cross-entropy loss, evaluation (loss,
accuracy and macro-F1, or ``eval.metrics``), the majority-class floor, top-class prediction, and the
checks of the config sections every classifier reads.

A task subclasses :class:`Classifier` and supplies how items become a batch (``inputs``) and a batch
becomes float logits (``batch_logits``), and how a label value becomes a class id (``label_id``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import metrics
from ..data.config import DataConfig
from ..models.config import ModelConfig
from .base import Batch, Example, majority_baseline
from .config import EvalConfig

METRICS = {"accuracy": metrics.accuracy, "macro_f1": metrics.macro_f1}


class Classifier:
    """Loss, evaluation, baseline and prediction over a task's ``batch_logits``.

    Attributes a subclass sets: ``eval`` (the run's eval section), ``labels`` (class names in id order,
    or None), ``empty_split_hint`` (what to check when a split to evaluate is empty) and
    ``unnamed_label`` (how a class without a name is reported, a format with one ``{}``).
    """

    eval: EvalConfig
    labels: list[str] | None
    empty_split_hint = "check data.split or data.files"
    unnamed_label = "LABEL_{}"

    # -- what a task supplies ----------------------------------------------------------------------

    def label_id(self, value: Any) -> int:
        raise NotImplementedError

    def inputs(self, items: Sequence[Any]) -> Batch:
        """Model inputs (no labels) for raw items: examples or what ``predict`` takes."""
        raise NotImplementedError

    def batch_logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Float32 logits ``[N, classes]`` of ``model`` on ``batch`` (labels in it are ignored)."""
        raise NotImplementedError

    def order(self, items: Sequence[Any]) -> list[int]:
        """The order items are batched in (as given; a task may group similar sizes)."""
        return list(range(len(items)))

    # -- shared --------------------------------------------------------------------------------------

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Mean cross entropy of the model's logits against ``batch["labels"]``."""
        if "labels" not in batch:
            raise KeyError("the batch has no 'labels': training and evaluation need a label on every example")
        logits = self.batch_logits(model, batch)
        return F.cross_entropy(logits, batch["labels"].to(logits.device))

    def evaluate(self, model: nn.Module, examples: Sequence[Example], batch_size: int) -> dict[str, float]:
        """Loss, accuracy and macro-F1 (or ``eval.metrics``) of ``model`` on labelled ``examples``.

        Macro-F1 averages over the classes that occur in the targets or the predictions.

        Raises:
            ValueError: ``examples`` is empty.
        """
        if not examples:
            raise ValueError(f"no examples to evaluate: the split is empty; {self.empty_split_hint}")
        targets = [self.label_id(e["label"]) for e in examples]
        total, predictions = 0.0, [0] * len(examples)
        for idx, logits in self.forward_batches(model, examples, batch_size):
            labels = torch.tensor([targets[i] for i in idx], device=logits.device)
            total += F.cross_entropy(logits, labels, reduction="sum").item()
            for i, p in zip(idx, logits.argmax(-1).tolist()):
                predictions[i] = p
        wanted = self.eval.metrics or list(METRICS)
        return {"loss": total / len(examples), **{m: METRICS[m](predictions, targets) for m in wanted}}

    def baseline(self, splits: Mapping[str, Sequence[Example]]) -> dict[str, Any] | None:
        """The majority-class floor a comparison's rows must clear (:func:`majority_baseline`)."""
        wanted = self.eval.metrics or list(METRICS)
        return majority_baseline(splits, self.label_id, {m: METRICS[m] for m in wanted})

    def predict(self, model: nn.Module, inputs: Sequence[Any], batch_size: int) -> list[dict[str, Any]]:
        """``{"label": name, "score": probability}`` of the most likely class for each input, in order."""
        names = self.class_names(model)
        out: list[dict[str, Any]] = [{}] * len(inputs)
        for idx, logits in self.forward_batches(model, inputs, batch_size):
            score, best = logits.softmax(-1).max(-1)
            for i, b, s in zip(idx, best.tolist(), score.tolist()):
                out[i] = {"label": names[b] if b < len(names) else self.unnamed_label.format(b), "score": s}
        return out

    def class_names(self, model: nn.Module) -> list[str]:
        """The names predictions are reported with: the task's labels (a task may ask the model)."""
        return self.labels or []

    def forward_batches(
        self, model: nn.Module, items: Sequence[Any], batch_size: int
    ) -> Iterator[tuple[list[int], torch.Tensor]]:
        """``(indices, logits)`` per batch, in eval mode without gradients; the mode is restored after."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        order = self.order(items)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(order), batch_size):
                    idx = order[start : start + batch_size]
                    yield idx, self.batch_logits(model, self.inputs([items[i] for i in idx]))
        finally:
            model.train(was_training)


def head_problems(model: ModelConfig, data: DataConfig, dtypes: Sequence[str]) -> list[str]:
    """Problems of what every classifier reads to build its head: the dtype (one of ``dtypes``), the
    number of classes and the class names."""
    problems = []
    if model.dtype not in dtypes:
        problems.append(f"model.dtype: expected one of {', '.join(dtypes)}, got {model.dtype!r}")
    if model.num_labels is not None and model.num_labels < 2:
        problems.append(f"model.num_labels: expected 2 or more classes (or unset), got {model.num_labels}")
    labels = data.labels
    if labels is not None and (len(labels) < 2 or len({str(n) for n in labels}) != len(labels)):
        problems.append(f"data.labels: expected 2 or more distinct class names, got {labels!r}")
    return problems


def metric_problems(eval: EvalConfig, kind: str) -> list[str]:
    """``eval.metrics`` names a metric a classifier does not report (``kind``: "text classification")."""
    unknown = [m for m in eval.metrics if m not in METRICS]
    if unknown:
        return [f"eval.metrics: {unknown} unknown for {kind}; known: {', '.join(METRICS)}"]
    return []

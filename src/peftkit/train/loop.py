"""One explicit training loop for any ``nn.Module``, in the spirit of nanoGPT's ``train.py``.

A batch is ``(inputs, targets)``. ``inputs`` is a mapping (passed as keyword arguments, as a
transformers tokenizer returns it) or a tensor (passed positionally). The model may return a tensor
of logits or an object with a ``.logits`` attribute (transformers' ``ModelOutput``).

The loop does not touch global state such as ``torch.set_num_threads``: that is the caller's choice
(the demo sets it once, before it builds the model).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Batch = tuple[Any, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def logits_of(model: nn.Module, inputs: Any) -> torch.Tensor:
    """Run ``model`` on ``inputs`` (a mapping of keyword arguments or a tensor) and return its logits."""
    out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def train(
    model: nn.Module,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    *,
    steps: int | None = None,
    epochs: int = 1,
    loss_fn: LossFn = F.cross_entropy,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    max_grad_norm: float | None = 1.0,
    log_every: int = 0,
    log: Callable[[str], None] = print,
) -> list[float]:
    """Train ``model`` in place and return the loss of every step.

    Args:
        model: Any module; it is put in training mode and left there.
        batches: Re-iterable ``(inputs, targets)`` batches, e.g. a list or a ``DataLoader``. An
            endless generator also works when ``steps`` is given.
        optimizer: Holds the parameters to train (for an adapter, only the trainable ones).
        steps: Number of optimizer steps; ``batches`` is iterated again each time it runs out, so
            this may span several epochs. ``None`` runs ``epochs`` full passes instead.
        epochs: Passes over ``batches`` when ``steps`` is ``None``.
        loss_fn: ``loss_fn(logits, targets)`` returning a scalar.
        scheduler: Learning-rate schedule, stepped once after every optimizer step.
        max_grad_norm: Clip the gradient norm of the optimized parameters to this; ``None`` disables
            clipping. Clipping guards against the rare spike that would make an adapter diverge.
        log_every: Print the running mean loss every this many steps (0: never).
        log: Where progress lines go.

    Returns:
        The loss of each step, in order.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    for epoch, (inputs, targets) in itertools.islice(_epochs(batches, steps is None, epochs), steps):
        loss = loss_fn(logits_of(model, inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
        if log_every and len(losses) % log_every == 0:
            recent = losses[-log_every:]
            log(
                f"step {len(losses):>5}{f'/{steps}' if steps else ''} | epoch {epoch} | "
                f"loss {sum(recent) / len(recent):.4f} | {time.perf_counter() - start:.1f}s"
            )
    return losses


def _epochs(batches: Iterable[Batch], bounded: bool, epochs: int) -> Iterator[tuple[int, Batch]]:
    """``(epoch, batch)`` pairs: ``epochs`` passes over ``batches`` if bounded, else without end."""
    epoch = 0
    while not bounded or epoch < epochs:
        empty = True
        for batch in batches:
            empty = False
            yield epoch, batch
        if empty:  # also catches a one-shot iterator that a second epoch finds exhausted
            raise ValueError(
                "`batches` yielded no batch: pass a non-empty, re-iterable collection of batches"
            )
        epoch += 1


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets of every batch, concatenated, computed in eval mode (dropout off).

    The model's previous training mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    logits, targets = [], []
    try:
        for inputs, batch_targets in batches:
            logits.append(logits_of(model, inputs))
            targets.append(batch_targets)
    finally:
        model.train(was_training)
    if not logits:
        raise ValueError("`batches` yielded no batch; cannot evaluate an empty data set")
    return torch.cat(logits), torch.cat(targets)


def evaluate_accuracy(model: nn.Module, batches: Iterable[Batch]) -> float:
    """Fraction of examples whose arg-max logit equals the target, in eval mode."""
    logits, targets = predict(model, batches)
    return (logits.argmax(dim=-1) == targets).float().mean().item()

"""What LoRA's data-aware inits (EVA, CorDA) share: the starting factors handed to the layer builders,
and the inputs of the target layers on a few batches.

An adapter layer is built from plain values (``LoraConfig.layer_values``), but EVA's A and CorDA's A
and B come from activations, one tensor per module. :func:`starting_from` holds them for the duration
of one ``inject``, keyed by the base module, and :func:`supplied` is how ``LoraLinear`` asks for its
own; nothing is stored on the model or in the config.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from ..core.targeting import HFConv1D, Target

Forward = Callable[[nn.Module, Any], Any]

_STARTS: ContextVar[Mapping[int, Any] | None] = ContextVar("peftkit_lora_starts", default=None)


@contextlib.contextmanager
def starting_from(starts: Mapping[nn.Module, Any]) -> Iterator[None]:
    """Within the block, a LoRA layer built on one of ``starts``' modules gets that module's start."""
    token = _STARTS.set({id(module): value for module, value in starts.items()})
    try:
        yield
    finally:
        _STARTS.reset(token)


def supplied(base_layer: nn.Module) -> Any:
    """The start :func:`starting_from` holds for ``base_layer`` (None outside it, or for another module)."""
    starts = _STARTS.get()
    return None if starts is None else starts.get(id(base_layer))


def call_model(model: nn.Module, batch: Any) -> Any:
    """The default forward: ``model(**batch)`` for a mapping (a tokenized batch), else ``model(batch)``."""
    return model(**batch) if isinstance(batch, Mapping) else model(batch)


def token_mask(batch: Any, use_labels: bool = False, ignore: int = -100) -> torch.Tensor | None:
    """Which positions of a tokenized batch are real tokens (``attention_mask``), and with ``use_labels``
    also have a label other than ``ignore`` (labels shaped like the tokens: a language model's); None when
    the batch says nothing (every row of every layer's input counts)."""
    if not isinstance(batch, Mapping):
        return None
    attention, labels = batch.get("attention_mask"), batch.get("labels")
    mask = attention.bool() if isinstance(attention, torch.Tensor) else None
    if use_labels and isinstance(labels, torch.Tensor) and labels.dim() == 2:
        keep = labels != ignore
        mask = keep if mask is None else (mask & keep if mask.shape == keep.shape else mask)
    return mask


def rows_of(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A layer's input as ``tokens x features`` float32, keeping the masked positions where the input is
    laid out per token (``batch x seq x features``); other inputs (a pooler's) keep every row."""
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        x = x[mask.to(x.device)]
    return x.reshape(-1, x.shape[-1]).float()


def linear_targets(targets: Iterable[Target], init: str) -> list[Target]:
    """The targets, checked to be linear layers (EVA and CorDA read a weight matrix and its inputs).

    Raises:
        UnsupportedLayerError: a target is another kind of layer, or a parameter target.
    """
    from ..errors import UnsupportedLayerError

    kinds = (nn.Linear, HFConv1D) if HFConv1D else (nn.Linear,)
    out, bad = [], []
    for target in targets:
        if target.parameters or not isinstance(target.module, kinds):
            bad.append(f"{target.name} ({type(target.module).__name__})")
        else:
            out.append(target)
    if bad:
        raise UnsupportedLayerError(
            f"init_lora_weights={init!r} starts from a linear layer's inputs; these targets are not linear "
            f"layers: {', '.join(bad)}. Leave them out (target_modules / exclude_modules) or use another init."
        )
    return out


def run_hooked(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    batch: Any,
    forward: Forward,
    take: Callable[[str, torch.Tensor], None],
) -> None:
    """One forward of ``batch`` without gradients, model in eval mode, calling ``take(name, input)`` with
    the first positional input of each module in ``modules``; the hooks are removed whatever happens."""
    handles = [
        module.register_forward_hook(lambda _m, args, _out, name=name: take(name, args[0]))
        for name, module in modules.items()
    ]
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)

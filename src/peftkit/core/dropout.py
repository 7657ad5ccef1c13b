"""Dropout in the frozen base model, as a choice: keep it, turn attention dropout off, or turn it all off.

In parameter-efficient training the base's dropout regularises nothing that trains except through the
activations the adapter sees (the adapters have their own dropout), yet on CPU it costs a quarter of a
LoRA step: the masks are drawn for every activation, and attention dropout makes scaled-dot-product
attention fall back to its unfused path (docs/training.md, "Dropout in the frozen base").

Attention dropout is found on the module types that compute attention (their class name says
"Attention", or ``nn.MultiheadAttention``), where transformers and torch keep it either as a dropout
module that they read ``p`` from, or as a float attribute they pass to attention. Setting either to 0
after loading has the effect of loading with the config's attention dropout at 0.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError
from .layer import AdapterModule, ModelPart, ModulesToSave

# "all_off", not "off": YAML (and so a command-line override) reads a bare off as false
BASE_DROPOUT_MODES = ("keep", "attention_off", "all_off")
# where attention modules keep the probability of dropping attention weights
_ATTENTION_DROPOUT_MODULES = ("dropout", "attn_dropout", "attention_dropout")
_ATTENTION_DROPOUT_FLOATS = ("dropout", "attention_dropout", "attn_dropout", "dropout_p")


@dataclass
class BaseDropout:
    """What :func:`set_base_dropout` changed: the mode and how many places it set to 0."""

    mode: str
    attention: int = 0
    other: int = 0

    def as_dict(self) -> dict[str, int | str]:
        return {"mode": self.mode, "attention_zeroed": self.attention, "other_zeroed": self.other}


def _is_attention(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention) or "Attention" in type(module).__name__


def head_outside_base(model: nn.Module) -> list[str]:
    """Names of a transformers model's children outside its ``base_model`` (a task head and the dropout
    before it): what a freshly initialised head that trains would keep. Empty for a plain module."""
    backbone = getattr(model, "base_model", model)
    if backbone is model:
        return []
    return [name for name, child in model.named_children() if child is not backbone]


def set_base_dropout(model: nn.Module, mode: str, *, skip: Iterable[str] = ()) -> BaseDropout:
    """Set the base model's dropout as ``mode`` says, in place; call it before injecting adapters.

    Args:
        model: Any ``nn.Module`` (a transformers model, a torchvision CNN, a plain module).
        mode: "keep" changes nothing; "attention_off" sets the dropout on attention weights to 0;
            "all_off" sets every dropout of the base to 0 (attention, hidden states, embeddings).
        skip: Names of submodules left as they are, such as a freshly initialised task head that
            trains and keeps its own dropout.

    Raises:
        ConfigError: ``mode`` is not one of :data:`BASE_DROPOUT_MODES`.
    """
    if mode not in BASE_DROPOUT_MODES:
        raise ConfigError(
            [f"base dropout: expected one of {', '.join(BASE_DROPOUT_MODES)}, got {mode!r}"],
            what="model.base_dropout",
        )
    report = BaseDropout(mode)
    if mode == "keep":
        return report
    # Adapters (added before or after) keep the dropout their config asks for, and trained copies of
    # modules (modules_to_save) keep theirs: only the frozen base is changed.
    owned = (AdapterModule, ModelPart, ModulesToSave)
    skipped = tuple(skip) + tuple(n for n, m in model.named_modules() if n and isinstance(m, owned))
    seen: set[int] = set()
    for name, module in model.named_modules():
        if any(name == s or name.startswith(s + ".") for s in skipped) or not _is_attention(module):
            continue
        for attribute in _ATTENTION_DROPOUT_MODULES:
            child = getattr(module, attribute, None)
            if isinstance(child, nn.Dropout) and id(child) not in seen:
                seen.add(id(child))
                report.attention += child.p > 0
                child.p = 0.0
        for attribute in _ATTENTION_DROPOUT_FLOATS:
            value = module.__dict__.get(attribute)  # plain attributes only, not submodules
            if isinstance(value, float) and value > 0:
                setattr(module, attribute, 0.0)
                report.attention += 1
    if mode == "all_off":
        for name, module in model.named_modules():
            if any(name == s or name.startswith(s + ".") for s in skipped):
                continue
            if isinstance(module, nn.modules.dropout._DropoutNd) and id(module) not in seen:
                seen.add(id(module))
                report.other += module.p > 0
                module.p = 0.0
    return report

"""The optimizer of :func:`peftkit.train.fit`: AdamW over the trainable parameters.

Weight decay pulls weights towards zero. That is a sensible prior for weight matrices, but not for
biases and normalisation gains (a LayerNorm gain decayed to 0 switches its feature off) nor for
scaling vectors such as IA3's, which start at 1; so every parameter of at most one dimension, and
every parameter of a normalisation layer, goes to a group without decay (the usual practice since
BERT). With ``lora_plus_ratio`` the groups the adapters' methods ask for
(:meth:`~peftkit.core.config.AdapterConfig.param_groups`; LoRA's: A, B at a higher rate, embedding
adapters, everything else) are each split the same way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core import registry
from ..core.inject import is_adapted, state_of
from ..errors import ConfigError


def _is_norm(module: nn.Module) -> bool:
    # transformers' norms (LlamaRMSNorm, T5LayerNorm ...) are not torch classes; their names say it
    torch_norms = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase)
    return isinstance(module, torch_norms) or "norm" in type(module).__name__.lower()


def no_decay_ids(model: nn.Module) -> set[int]:
    """``id()`` of every parameter that weight decay should not touch (biases, norms, vectors)."""
    ids = {id(p) for p in model.parameters() if p.ndim <= 1}
    for module in model.modules():
        if _is_norm(module):
            ids.update(id(p) for p in module.parameters(recurse=False))
    return ids


def _split_by_decay(group: dict[str, Any], skip: set[int]) -> list[dict[str, Any]]:
    params = group["params"]
    decay = [p for p in params if id(p) not in skip]
    plain = [p for p in params if id(p) in skip]
    name = group.get("name", "params")
    out = []
    if decay:
        out.append({**group, "params": decay, "name": f"{name}_decay"})
    if plain:
        out.append({**group, "params": plain, "weight_decay": 0.0, "name": f"{name}_no_decay"})
    return out


def param_groups(
    model: nn.Module, lr: float, weight_decay: float = 0.0, lora_plus_ratio: float | None = None
) -> list[dict[str, Any]]:
    """AdamW parameter groups for the trainable parameters of ``model``.

    Args:
        model: Any module; only parameters with ``requires_grad`` are included.
        lr: Peak learning rate (LoRA+: the rate of A matrices and of everything that is not B).
        weight_decay: Decay for weight matrices; biases, norms and vectors get none.
        lora_plus_ratio: LoRA+ (arXiv:2402.12354): B matrices learn this many times faster.

    Raises:
        ConfigError: nothing is trainable, or LoRA+ was asked for a model without LoRA adapters.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError(
            [
                "the model has no trainable parameter: inject an adapter (peftkit.inject) or set "
                "requires_grad=True on the parameters to fine-tune"
            ],
            what="training setup",
        )
    if lora_plus_ratio is None:
        groups = [{"params": trainable, "lr": lr, "weight_decay": weight_decay, "name": "params"}]
    else:
        groups = _lora_plus_groups(model, lr, weight_decay, lora_plus_ratio)
    skip = no_decay_ids(model)
    return [split for group in groups for split in _split_by_decay(group, skip)]


def _lora_plus_groups(model: nn.Module, lr: float, weight_decay: float, ratio: float) -> list[dict[str, Any]]:
    # the groups come from the methods on the model (AdapterConfig.param_groups: LoRA's in methods/lora.py);
    # each config class is asked once, since its groups cover the whole model
    configs = list(state_of(model).configs.values()) if is_adapted(model) else []
    if not configs:
        raise ConfigError(
            [
                f"lora_plus_ratio={ratio} needs a LoRA-family adapter on the model, and it has none "
                "(full fine-tuning?): set train.lora_plus_ratio to null"
            ],
            what="training setup",
        )
    for config in {type(c): c for c in configs}.values():
        groups = config.param_groups(model, lr, lr_ratio=ratio, weight_decay=weight_decay)
        if groups is not None:
            return groups
    raise ConfigError(
        [
            f"lora_plus_ratio={ratio} needs trainable LoRA B matrices, and the model's adapters have none "
            "(LoRA+ applies to LoRA and DoRA only): set train.lora_plus_ratio to null"
        ],
        what="training setup",
    )


def make_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    lora_plus_ratio: float | None = None,
    optimizer: str = registry.DEFAULT_OPTIMIZER,
) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups` (PyTorch's default implementation for the device), or the optimizer
    a method registered as ``optimizer`` (``registry.register_optimizer``: LoRA-FA's ``"lora_fa"``), which
    builds its own groups over the model's trainable parameters.

    Raises:
        ConfigError: ``optimizer`` names no registered optimizer, or is combined with ``lora_plus_ratio``.
    """
    if optimizer == registry.DEFAULT_OPTIMIZER:
        return torch.optim.AdamW(param_groups(model, lr, weight_decay, lora_plus_ratio), lr=lr)
    build = registry.optimizer_builder(optimizer)
    problems = []
    if build is None:
        known = ", ".join(registry.registered_optimizers())
        problems.append(f"optimizer={optimizer!r} is not an optimizer peftkit knows; choose one of {known}")
    if lora_plus_ratio is not None:
        problems.append(
            f"lora_plus_ratio={lora_plus_ratio} sets AdamW's groups, and optimizer={optimizer!r} builds its own: "
            "set one of them (train.lora_plus_ratio: null, or train.optimizer: adamw)"
        )
    if problems:
        raise ConfigError(problems, what="training setup")
    return build(model, lr, weight_decay)

"""Counting a model's parameters the one way peftkit reports them everywhere (``trainable_summary``,
``metrics.json``, the experiment loggers, the selection budget)."""

from __future__ import annotations

import math

import torch
from torch import nn


def logical_numel(param: torch.Tensor) -> int:
    """Elements of the weight a parameter stands for: a bitsandbytes 4-bit weight packs two values per
    byte, so its storage's ``numel()`` is half of the (out, in) shape its ``quant_state`` records."""
    shape = getattr(getattr(param, "quant_state", None), "shape", None)
    return math.prod(int(n) for n in shape) if shape is not None else param.numel()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)``: every parameter once (tied weights too), adapters and the originals that
    ``modules_to_save`` keeps for the disabled path included, as the reference library counts."""
    unique = {id(p): p for p in model.parameters()}.values()
    return (
        sum(logical_numel(p) for p in unique if p.requires_grad),
        sum(logical_numel(p) for p in unique),
    )

"""A toy PEFT method that lives outside peftkit and registers itself the way a file in
``src/peftkit/methods/`` does: a rank-one additive update ``W + scale * b aᵀ`` on ``nn.Linear``.

``b`` starts at zero, so a fresh adapter leaves the model unchanged. ``test_toy_method.py`` imports this
module inside a fixture (never at collection, so the rest of the suite does not see a ``TOY`` method).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftkit.core.config import AdapterConfig
from peftkit.core.layer import AdapterModule, adapter_dtype
from peftkit.core.registry import register_layer, register_method

PEFT_TYPE = "TOY"


@register_method(PEFT_TYPE)
@dataclass
class ToyConfig(AdapterConfig):
    """Attributes:
    scale: Multiplies the update.
    """

    pick_when = "you are testing that a method registered from outside peftkit works everywhere"

    scale: float = 1.0

    def problems(self) -> list[str]:
        out = super().problems()
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
            out.append(f"scale: must be a number, got {self.scale!r}")
        return out

    def layer_values(self, target: Any) -> dict[str, Any]:
        return {"scale": float(self.scale)}


class ToyAdapter(AdapterModule):
    """Tensors (the interchange names): ``toy_a`` (in,) and ``toy_b`` (out,)."""

    def __init__(self, base_layer: nn.Linear, *, scale: float) -> None:
        super().__init__()
        weight = base_layer.weight
        factory = {"device": weight.device, "dtype": adapter_dtype(weight)}
        self.scale = scale
        self.toy_a = nn.Parameter(
            torch.randn(base_layer.in_features, **factory) / base_layer.in_features**0.5
        )
        self.toy_b = nn.Parameter(torch.zeros(base_layer.out_features, **factory))

    def delta_output(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        along_a = x.to(self.toy_a.dtype) @ self.toy_a  # (..., ) one number per position
        return (self.scale * along_a.unsqueeze(-1) * self.toy_b).to(base_out.dtype)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.outer(self.toy_b, self.toy_a)


register_layer(PEFT_TYPE, "Linear", (nn.Linear,), ToyAdapter)

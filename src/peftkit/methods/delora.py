"""DeLoRA: decoupled low-rank adaptation (Bini et al. 2025, arXiv:2503.18225).

DeLoRA is LoRA with the strength of the update decoupled from its direction. Each of the ``r`` rank-one
terms ``b_i a_iᵀ`` is normalised, and one learned scalar ``λ`` bounds the whole update:

    ΔW = (λ / r) · B Ξ A · diag(‖W_:,j‖)        Ξ = diag(1 / (‖a_i‖ ‖b_i‖))

with ``A`` (r, in) and ``B`` (out, r), ``a_i`` the rows of ``A``, ``b_i`` the columns of ``B`` (each norm
clamped below at 1e-4). Each normalised term has spectral norm at most 1, so ``‖ΔW‖`` stays within ``λ``
times the input-feature norms of the pretrained weight: the update cannot drift far whatever the learning
rate, and ``λ`` is the one knob of its size. ``diag(‖W_:,j‖)`` holds the column norms of
the base weight when the adapter was created, kept as the buffer ``delora_w_norm`` (saved with it, as in
the reference library, peft 0.21.2), so the delta depends on nothing that changes while training or
merging: the adapter is additive.

``A`` starts Kaiming-uniform and ``B`` at zero, so a fresh adapter leaves the model unchanged
(``init_weights=False``: both Kaiming-uniform, for tests); ``λ`` starts at ``delora_lambda``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core import checks
from ..core.config import AdapterConfig
from ..core.inject import trained_biases
from ..core.layer import AdapterModule, adapter_dtype
from ..core.registry import register_layer, register_method
from ..core.targeting import Target, pattern_value
from .lora import LoraConfig

PEFT_TYPE = "DELORA"
_NORM_FLOOR = 1e-4  # the reference's clamp of the row and column norms


@register_method(PEFT_TYPE)
@dataclass
class DeloraConfig(AdapterConfig):
    """Decoupled low-rank adaptation: a normalised rank-``r`` update whose size one learned ``λ`` bounds.

    Attributes:
        r: Rank of the update (per-module overrides via ``rank_pattern``).
        delora_lambda: Initial ``λ``, the bound on the update's size relative to the base weight's column
            norms (the reference default, 15; per-module overrides via ``lambda_pattern``). ``λ`` trains.
        module_dropout: Dropout on the adapter's input while training (elementwise, as the reference
            applies it, despite the name).
        bias: Base biases to train and save as well: "none", "all" or "delora_only" (adapted layers').
        init_weights: ``True``: ``B = 0``, the model starts at the base. ``False``: ``B`` Kaiming-uniform too
            (the adapter changes the output at once; for tests).
        lambda_pattern: Per-module ``delora_lambda`` overrides, keyed by a regex matched against the name's
            end (as ``rank_pattern``).
    """

    pick_when = "you want LoRA-like deltas whose size is bounded (normalised and scaled by a learned lambda): robust to the learning rate and to long training"

    fields_not_in_format: ClassVar[tuple[str, ...]] = ("alpha_pattern",)  # not in the reference

    r: int = 8
    delora_lambda: float = 15
    module_dropout: float = 0.0
    bias: str = "none"
    init_weights: bool = True
    lambda_pattern: dict[str, float] = field(default_factory=dict)

    display_name: ClassVar[str] = "DeLoRA"

    # The reference library uses LoRA's defaults per architecture for DeLoRA too.
    default_targets: ClassVar[dict[str, list[str]]] = LoraConfig.default_targets
    target_roles: ClassVar[tuple[str, ...]] = LoraConfig.target_roles
    own_default_types: ClassVar[tuple[str, ...]] = LoraConfig.own_default_types

    def problems(self) -> list[str]:
        out = super().problems()
        out += checks.positive_ints(self, "r")
        out += checks.finite(self, "delora_lambda")
        out += checks.dropout(self, "module_dropout")
        out += checks.bias_mode(self, "delora_only")
        out += checks.booleans(self, "init_weights")
        ranks = self.rank_pattern.values() if isinstance(self.rank_pattern, dict) else []
        if any(isinstance(v, float) and not float(v).is_integer() for v in ranks):
            out.append(f"rank_pattern: ranks must be whole numbers, got {self.rank_pattern!r}")
        if not isinstance(self.lambda_pattern, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.lambda_pattern.values()
        ):
            out.append(f"lambda_pattern: expected a dict of regex -> number, got {self.lambda_pattern!r}")
        if self.alpha_pattern:
            out.append(
                "alpha_pattern: DeLoRA has no alpha (the reference format has no alpha_pattern); its scale is "
                "delora_lambda, overridden per module by lambda_pattern"
            )
        return out

    def layer_values(self, target: Target) -> dict[str, Any]:
        lam = pattern_value(self.lambda_pattern, target.name)
        return {
            "r": int(target.rank or self.r),
            "lam": float(self.delora_lambda if lam is None else lam),
            "dropout": float(self.module_dropout),
            "init": bool(self.init_weights),
        }

    def extra_trainable(self, model: nn.Module, adapted: list[str]) -> list[str]:
        return trained_biases(model, adapted, self.bias)


class DeloraLinear(AdapterModule):
    """DeLoRA on ``nn.Linear``: ``delora_A`` (r, in), ``delora_B`` (out, r), ``delora_lambda`` (1,), and the
    buffer ``delora_w_norm`` (in,), the base weight's column norms when the adapter was made."""

    def __init__(self, base_layer: nn.Linear, r: int, lam: float, dropout: float, init: bool) -> None:
        super().__init__()
        weight = base_layer.weight
        kw = {"device": weight.device, "dtype": adapter_dtype(weight)}
        self.r = r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.delora_A = nn.Parameter(torch.empty(r, base_layer.in_features, **kw))
        self.delora_B = nn.Parameter(torch.empty(base_layer.out_features, r, **kw))
        self.delora_lambda = nn.Parameter(torch.full((1,), lam, **kw))
        nn.init.kaiming_uniform_(self.delora_A, a=math.sqrt(5))
        if init:
            nn.init.zeros_(self.delora_B)
        else:
            nn.init.kaiming_uniform_(self.delora_B, a=math.sqrt(5))
        with torch.no_grad():
            self.register_buffer("delora_w_norm", weight.detach().to(kw["dtype"]).norm(dim=0))

    def scaling(self) -> torch.Tensor:
        """``λ / (r ‖a_i‖ ‖b_i‖)`` for each rank-one term, (r,)."""
        a_norm = self.delora_A.norm(dim=1).clamp_min(_NORM_FLOOR)
        b_norm = self.delora_B.norm(dim=0).clamp_min(_NORM_FLOOR)
        return self.delora_lambda / self.r / (a_norm * b_norm)

    def delta_output(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        x = self.dropout(x.to(self.delora_A.dtype))
        h = F.linear(x * self.delora_w_norm, self.delora_A) * self.scaling()
        return F.linear(h, self.delora_B).to(base_out.dtype)

    def delta_factors(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.delora_B * self.scaling(), self.delora_A * self.delora_w_norm

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        left, right = self.delta_factors(weight)
        return (left @ right).to(weight.dtype)


register_layer(PEFT_TYPE, "Linear", (nn.Linear,), DeloraLinear)


__all__ = ["DeloraConfig", "DeloraLinear"]

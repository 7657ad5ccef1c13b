"""RoAd: 2-D rotary adaptation (Liao and Monz 2024, arXiv:2409.00119).

RoAd rotates a linear layer's output in 2-D planes and scales it: the output features are split into
groups of ``group_size``, and within a group feature ``k`` of the first half pairs with feature
``k + group_size/2`` of the second half. Each pair ``(a, b)`` of the output ``h = W x + b`` becomes

    a' = α₁ cos θ₁ · a − α₁ sin θ₁ · b        b' = α₂ sin θ₂ · a + α₂ cos θ₂ · b

(the paper's eq. 4 in the grouped layout of the reference library, peft 0.21.2, which pairs halves of a
group rather than neighbours: the same model up to a permutation of features, and faster to serve). With
``f = α cos θ`` and ``s = α sin θ`` per output feature, ``y = h ⊙ f + rotate_half(h) ⊙ s``, where
``rotate_half`` maps each group's halves ``[a | b]`` to ``[−b | a]`` (as rotary position embeddings do).

Variants (``variant``) share angles and scales differently; the stored tensors ``road_theta`` and
``road_alpha`` have the reference's sizes and order:

* ``road_1``: one ``(θ, α)`` per pair, both rows of the pair use it: ``out / 2`` each.
* ``road_2``: one ``(θ, α)`` per output feature: ``out`` each.
* ``road_4``: per output feature separate ``(θ, α)`` for ``f`` and for ``s``: ``2 * out`` each, laid out
  per group as ``[the group's f entries | its s entries]``.

The rotation acts on the output, so merging rewrites both weight and bias: ``W' = R W``, ``b' = R b``
(``R`` block-diagonal with 2x2 blocks). Unmerge applies ``R⁻¹`` pair by pair. ``θ = 0``, ``α = 1`` at the
start: a fresh adapter leaves the model unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..core import checks
from ..core.config import AdapterConfig
from ..core.layer import AdapterModule, adapter_dtype
from ..core.registry import register_layer, register_method
from ..core.targeting import Target
from ..errors import UnsupportedLayerError
from .lora import LoraConfig

PEFT_TYPE = "ROAD"
VARIANTS = {"road_1": 0.5, "road_2": 1, "road_4": 2}  # stored values per output feature
# AdapterConfig fields the reference's RoAd config does not have
_NOT_IN_REFERENCE = (
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
)


@register_method(PEFT_TYPE)
@dataclass
class RoadConfig(AdapterConfig):
    """2-D rotary adaptation: each targeted linear layer's output turns in planes of feature pairs and scales.

    Attributes:
        variant: How angles and scales are shared: "road_1" (per pair, the reference default), "road_2"
            (per feature) or "road_4" (per feature, separate for the two entries of each rotation row).
        group_size: Features per group (even; the reference default, 64); feature ``k`` pairs with
            ``k + group_size/2`` in its group. It must divide every adapted layer's output features. It
            changes no result (features are unordered), only the memory layout serving engines prefer.
        init_weights: ``True``: ``θ = 0``, ``α = 1``, the model starts at the base. ``False``:
            ``θ ~ N(0, 0.5²)``, ``α ~ N(1, 0.5²)`` (the adapter changes the output at once; for tests).
    """

    pick_when = "you serve many adapters in mixed batches: a 2-D rotation and scale per pair of output features is the cheapest to route per request"
    lr_candidates: ClassVar[tuple[float, ...]] = (
        1e-3,
        3e-3,
        1e-2,
    )  # a rotation and scale per pair of features: few parameters, trained at LoRA's rates and above in its paper

    fields_not_in_format: ClassVar[tuple[str, ...]] = _NOT_IN_REFERENCE

    variant: str = "road_1"
    group_size: int = 64
    init_weights: bool = True

    display_name: ClassVar[str] = "RoAd"

    # The reference library uses LoRA's defaults per architecture for RoAd too.
    default_targets: ClassVar[dict[str, list[str]]] = LoraConfig.default_targets
    target_roles: ClassVar[tuple[str, ...]] = LoraConfig.target_roles
    own_default_types: ClassVar[tuple[str, ...]] = LoraConfig.own_default_types

    def problems(self) -> list[str]:
        out = super().problems()
        if self.variant not in VARIANTS:
            out.append(f"variant: must be one of {', '.join(map(repr, VARIANTS))}, got {self.variant!r}")
        size = self.group_size
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % 2:
            out.append(f"group_size: must be a positive even integer (pairs of features), got {size!r}")
        out += checks.booleans(self, "init_weights")
        for name in _NOT_IN_REFERENCE:
            if getattr(self, name) not in (None, [], {}, ""):
                hint = (
                    "name the modules to adapt in target_modules (a list, or a regex that leaves the others out)"
                    if name in ("exclude_modules", "layers_to_transform", "layers_pattern")
                    else "RoAd has no rank or alpha; leave it empty"
                )
                out.append(
                    f"{name}: not part of the ROAD format (the reference library has no such field); {hint}"
                )
        return out

    def layer_values(self, target: Target) -> dict[str, Any]:
        return {"variant": self.variant, "group_size": int(self.group_size), "init": bool(self.init_weights)}


def rotate_half(h: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each group's halves ``[a | b]`` of the last dimension as ``[-b | a]``."""
    grouped = h.reshape(*h.shape[:-1], -1, 2, group_size // 2)
    return torch.stack((-grouped[..., 1, :], grouped[..., 0, :]), dim=-2).reshape(h.shape)


def swap_halves(v: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each group's halves ``[a | b]`` as ``[b | a]``: every feature's partner."""
    return v.reshape(-1, 2, group_size // 2).flip(1).reshape(v.shape)


class RoadLinear(AdapterModule):
    """RoAd on ``nn.Linear``: the base output turns (``transforms = "output"``); merged into weight and bias."""

    transforms = "output"
    # R W depends on W only linearly, but R also turns whatever other adapters add to the output: the
    # core merges it only alone on its layer, where merged and unmerged agree.
    additive = False

    def __init__(self, base_layer: nn.Linear, variant: str, group_size: int, init: bool) -> None:
        super().__init__()
        out_f = base_layer.out_features
        if out_f % group_size:
            raise UnsupportedLayerError(
                f"RoAd group_size={group_size} must divide the layer's {out_f} output features (it pairs "
                "features within groups); choose an even divisor"
            )
        self.variant, self.group_size = variant, group_size
        self.merge_into = ("weight",) if base_layer.bias is None else ("weight", "bias")
        kw = {"device": base_layer.weight.device, "dtype": adapter_dtype(base_layer.weight)}
        size = int(out_f * VARIANTS[variant])
        theta, alpha = torch.zeros(size, **kw), torch.ones(size, **kw)
        if not init:
            nn.init.normal_(theta, 0.0, 0.5)
            nn.init.normal_(alpha, 1.0, 0.5)
        self.road_theta, self.road_alpha = nn.Parameter(theta), nn.Parameter(alpha)
        self._merged: tuple[torch.Tensor, torch.Tensor] | None = None  # (f, s) a merge used, for unmerge

    def columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f, s)`` per output feature: ``y = h ⊙ f + rotate_half(h) ⊙ s``."""
        theta, alpha, half = self.road_theta, self.road_alpha, self.group_size // 2
        if self.variant == "road_1":  # a group's half-size values serve both halves
            theta = theta.reshape(-1, 1, half).expand(-1, 2, half).reshape(-1)
            alpha = alpha.reshape(-1, 1, half).expand(-1, 2, half).reshape(-1)
        if self.variant == "road_4":  # per group: [its f values | its s values]
            theta = theta.reshape(-1, 2, self.group_size)
            alpha = alpha.reshape(-1, 2, self.group_size)
            return (alpha[:, 0] * theta[:, 0].cos()).reshape(-1), (alpha[:, 1] * theta[:, 1].sin()).reshape(
                -1
            )
        return alpha * theta.cos(), alpha * theta.sin()

    def _turn(self, h: torch.Tensor, f: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Turn the last dimension of ``h`` (output features)."""
        return h * f + rotate_half(h, self.group_size) * s

    def transform(self, tensor: torch.Tensor) -> torch.Tensor:
        f, s = self.columns()
        return self._turn(tensor.to(f.dtype), f, s).to(tensor.dtype)

    def _rotated(
        self, tensors: dict[str, torch.Tensor], f: torch.Tensor, s: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        # R acts on output features: the rows of the weight (turned as columns of Wᵀ) and the bias
        out = {"weight": self._turn(tensors["weight"].T, f, s).T.contiguous()}
        if "bias" in tensors:
            out["bias"] = self._turn(tensors["bias"], f, s)
        return {k: v.to(tensors[k].dtype) for k, v in out.items()}

    def merged_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        f, s = (c.detach() for c in self.columns())
        self._merged = (f, s)
        like = tensors["weight"]
        return self._rotated(tensors, f.to(like.dtype), s.to(like.dtype))

    def unmerged_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # Each pair (k, p) turns by [[f_k, -s_k], [s_p, f_p]] (k in the first half); its inverse has the
        # same form with f' = f_p / det, s' = -s / det, det = f_k f_p + s_k s_p: computed in float64.
        assert self._merged is not None, "unmerge of an adapter that was never merged"
        f, s = (c.to(torch.float64) for c in self._merged)
        f_partner, s_partner = swap_halves(f, self.group_size), swap_halves(s, self.group_size)
        det = f * f_partner + s * s_partner
        wide = {k: v.to(torch.float64) for k, v in tensors.items()}
        back = self._rotated(wide, f_partner / det, -s / det)
        return {k: v.to(tensors[k].dtype) for k, v in back.items()}

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        f, s = (c.detach() for c in self.columns())
        return self._turn(weight.T, f.to(weight.dtype), s.to(weight.dtype)).T - weight


register_layer(PEFT_TYPE, "Linear", (nn.Linear,), RoadLinear)


__all__ = ["RoadConfig", "RoadLinear"]

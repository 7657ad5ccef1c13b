"""GraLoRA: granular low-rank adaptation (Jung et al. 2025, arXiv:2505.20355).

LoRA gives a weight one low-rank pair; GraLoRA cuts the weight into a ``k x k`` grid of blocks and gives
every block its own pair of rank ``r / k`` (the paper's eq. 5). The parameter count is LoRA's at rank
``r`` (``r (in + out)``), but the update's rank can reach ``k r``, and a large activation in one input
block only reaches the gradients of the ``k`` pairs that read that block (the paper's point: LoRA's
single bottleneck spreads an outlier channel's gradient over the whole update).

Tensor layout (the reference library's, peft 0.21.2): ``gralora_A`` (k, in/k, r) holds, for input block
``n``, the columns of the ``k`` A-matrices reading it, block ``j``'s in columns ``j r/k .. (j+1) r/k``;
``gralora_B`` (k, r, out/k) holds, for output block ``j``, the rows of the ``k`` B-matrices writing it,
input block ``n``'s in rows ``n r/k .. (n+1) r/k``. The block (output ``j``, input ``n``) of the update is

    ΔW[j, n] = s · (A[n][:, j-th slice] · B[j][n-th slice, :])ᵀ,          s = alpha / (r + hybrid_r)

``hybrid_r > 0`` adds a plain LoRA pair of that rank over the whole weight (``gralora_A_general``,
``gralora_B_general``: the paper's Hybrid GraLoRA), at the same scale. As two factors the whole update is
``L R`` with ``L`` (out, k r) block-diagonal over output blocks and ``R`` (k r, in) block-diagonal over
input blocks within each output block's rows (:meth:`GraloraAdapter.factors`): merging, ``combine`` and
``convert_to_lora`` use it exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..core import checks
from ..core.config import AdapterConfig
from ..core.inject import trained_biases
from ..core.layer import AdapterModule, adapter_dtype
from ..core.registry import register_layer, register_method
from ..core.targeting import HFConv1D, Target
from ..errors import UnsupportedLayerError
from .lora import LoraConfig

PEFT_TYPE = "GRALORA"


@register_method(PEFT_TYPE)
@dataclass
class GraloraConfig(AdapterConfig):
    """Granular LoRA: a ``k x k`` grid of low-rank pairs per targeted weight.

    Attributes:
        r: Total rank of the granular part, as LoRA's ``r`` for the parameter count; each of the ``k²``
            blocks gets rank ``r / k`` (so ``r`` must be a multiple of ``gralora_k``). Default 32.
        hybrid_r: Rank of an extra plain LoRA pair over the whole weight (Hybrid GraLoRA); 0 for none.
        alpha: Scale numerator: the update is multiplied by ``alpha / (r + hybrid_r)``. Default 64.
        gralora_dropout: Dropout on the adapter's input during training.
        gralora_k: Blocks per side; each targeted layer's input and output features must be multiples of
            it. The paper suggests 2 up to rank 32 and 4 from rank 64.
        fan_in_fan_out: Recorded for the interchange format; the layout is read from the layer type
            (GPT-2's ``Conv1D`` stores its weight transposed).
        bias: Base biases to train and save as well: "none", "all" or "gralora_only" (adapted layers').
        init_weights: ``True``: A Kaiming-uniform, B zero (the adapter starts at the base model);
            ``False``: B Kaiming-uniform as well (for tests).
    """

    pick_when = "LoRA at a high rank stops improving: the same parameters as a k x k grid of small pairs give more expressive, local updates"

    # the reference's GraLoRA config has none of these fields: left out of the file while unset
    fields_not_in_format: ClassVar[tuple[str, ...]] = ("exclude_modules", "rank_pattern", "alpha_pattern")

    r: int = 32
    hybrid_r: int = 0
    alpha: float = 64
    gralora_dropout: float = 0.0
    gralora_k: int = 2
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True

    # The reference library's GraLoRA defaults per architecture are a copy of its LoRA table.
    default_targets: ClassVar[dict[str, list[str]]] = LoraConfig.default_targets
    target_roles: ClassVar[tuple[str, ...]] = LoraConfig.target_roles
    own_default_types: ClassVar[tuple[str, ...]] = LoraConfig.own_default_types
    display_name: ClassVar[str] = "GraLoRA"

    def problems(self) -> list[str]:
        out = super().problems()
        for name, low in (("r", 1), ("gralora_k", 1), ("hybrid_r", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                what = "a positive" if low else "a non-negative"
                out.append(f"{name}: must be {what} integer, got {value!r}")
        r, k = self.r, self.gralora_k
        if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (r, k)) and r % k:
            out.append(
                f"r: must be a multiple of gralora_k={k} (each of the k x k blocks gets rank r/k), got r={r}; "
                f"use r={-(-r // k) * k} or a gralora_k dividing {r}"
            )
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            out.append(f"alpha: must be a positive number, got {self.alpha!r}")
        out += checks.dropout(self, "gralora_dropout")
        out += checks.booleans(self, "fan_in_fan_out", "init_weights")
        out += checks.bias_mode(self, "gralora_only")
        for name in ("exclude_modules", "rank_pattern", "alpha_pattern"):
            if getattr(self, name):
                out.append(
                    f"{name}: the reference library's GraLoRA format has no {name}, so a file using it would "
                    "mean something else there; "
                    + (
                        "name the modules to adapt in target_modules instead"
                        if name == "exclude_modules"
                        else "use one r and alpha for all targets, or inject separate adapters"
                    )
                )
        return out

    def layer_values(self, target: Target) -> dict[str, Any]:
        return {
            "r": int(self.r),
            "k": int(self.gralora_k),
            "hybrid_r": int(self.hybrid_r),
            "scaling": float(self.alpha) / (self.r + self.hybrid_r),
            "dropout": float(self.gralora_dropout),
            "init": bool(self.init_weights),
        }

    def extra_trainable(self, model: nn.Module, adapted: list[str]) -> list[str]:
        return trained_biases(model, adapted, self.bias)


def _kaiming(tensor: torch.Tensor, fan_in: int) -> None:
    # nn.Linear's default init (Kaiming-uniform with a = sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bound = 1 / math.sqrt(fan_in)
    nn.init.uniform_(tensor, -bound, bound)


class GraloraAdapter(AdapterModule):
    """GraLoRA on ``nn.Linear`` and on transformers' GPT-2 ``Conv1D`` (weight stored as in x out)."""

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        k: int,
        hybrid_r: int,
        scaling: float,
        dropout: float,
        init: bool,
    ) -> None:
        super().__init__()
        weight = base_layer.weight
        self.transposed = not isinstance(base_layer, nn.Linear)
        out_f, in_f = (weight.shape[1], weight.shape[0]) if self.transposed else weight.shape
        if in_f % k or out_f % k:
            raise UnsupportedLayerError(
                f"GraLoRA with gralora_k={k} cuts the weight into {k} x {k} blocks, so a layer's input and output "
                f"features must be multiples of {k}; this layer has {in_f} in and {out_f} out. Choose a gralora_k "
                "dividing both, or leave the layer out of target_modules."
            )
        self.r, self.k, self.hybrid_r, self.scaling = r, k, hybrid_r, scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        kw = {"device": weight.device, "dtype": adapter_dtype(weight)}
        self.gralora_A = nn.Parameter(torch.empty(k, in_f // k, r, **kw))
        self.gralora_B = nn.Parameter(torch.empty(k, r, out_f // k, **kw))
        with torch.no_grad():
            # as the reference draws them: each input block's A like a Linear reading in/k features, B zero
            # (so the adapter starts at the base) or, for tests, like a Linear reading r
            _kaiming(self.gralora_A, in_f // k)
            if init:
                nn.init.zeros_(self.gralora_B)
            else:
                _kaiming(self.gralora_B, r)
            if hybrid_r:
                self.gralora_A_general = nn.Linear(in_f, hybrid_r, bias=False, **kw)
                self.gralora_B_general = nn.Linear(hybrid_r, out_f, bias=False, **kw)
                _kaiming(self.gralora_A_general.weight, in_f)
                if init:
                    nn.init.zeros_(self.gralora_B_general.weight)
                else:
                    _kaiming(self.gralora_B_general.weight, hybrid_r)

    def granular(self, x: torch.Tensor) -> torch.Tensor:
        """The unscaled granular path on ``x`` (..., in) -> (..., out), block by block."""
        k, s = self.k, self.r // self.k
        # h[..., n, :] = x_n A[n]: every pair reading input block n, at once (r = k slices of s)
        h = torch.einsum("...ni,nir->...nr", x.unflatten(-1, (k, -1)), self.gralora_A)
        # output block j takes slice j of every input block's h, in input-block order: B[j]'s rows
        h = h.unflatten(-1, (k, s)).transpose(-3, -2).flatten(-2)  # (..., j, n·s)
        return torch.einsum("...jr,jro->...jo", h, self.gralora_B).flatten(-2)

    def delta_output(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        xd = self.dropout(x.to(self.gralora_A.dtype))
        out = self.granular(xd)
        if self.hybrid_r:
            out = out + self.gralora_B_general(self.gralora_A_general(xd))
        return (out * self.scaling).to(base_out.dtype)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The unscaled update as ``L @ R``, L (out, k r [+ hybrid_r]) and R (k r [+ hybrid_r], in).

        Column ``(j, n, t)`` of L is row ``n s + t`` of ``B[j]`` placed in output block ``j``; row ``(j, n, t)``
        of R is column ``j s + t`` of ``A[n]`` placed in input block ``n`` (s = r / k)."""
        a, b = self.gralora_A, self.gralora_B
        k, s = self.k, self.r // self.k
        eye = torch.eye(k, dtype=a.dtype, device=a.device)
        left = torch.einsum("jro,jm->jomr", b, eye).reshape(b.shape[0] * b.shape[2], k * self.r)
        right = torch.einsum("nijt,nm->jntmi", a.unflatten(2, (k, s)), eye).reshape(k * self.r, -1)
        if self.hybrid_r:
            left = torch.cat([left, self.gralora_B_general.weight], dim=1)
            right = torch.cat([right, self.gralora_A_general.weight], dim=0)
        return left, right

    def delta_factors(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        left, right = self.factors()
        return self.scaling * left, right

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        left, right = self.factors()
        rows = (self.scaling * left @ right).to(weight.dtype)
        return rows.T if self.transposed else rows


register_layer(PEFT_TYPE, "Linear", (nn.Linear,), GraloraAdapter)
if HFConv1D:
    register_layer(PEFT_TYPE, "Conv1D (GPT-2)", (HFConv1D,), GraloraAdapter)


__all__ = ["GraloraConfig", "GraloraAdapter"]

"""HRA: Householder reflection adaptation (Yuan et al. 2024, arXiv:2405.17484).

HRA turns the frozen weight by an orthogonal matrix built from ``r`` Householder reflections. Each
reflection is ``R_i = I - 2 u_i u_iᵀ`` for a learned unit vector ``u_i`` in the space of the layer's
input features; the layer's weight becomes ``W H`` with ``H = R_1 R_2 ... R_r`` (the paper's eq. 4:
a chain of reflections is orthogonal, and with ``r`` reflections it bridges OFT and LoRA: ``W H - W``
has rank at most ``r``). The stored tensor ``hra_u`` is the ``(features, r)`` matrix of the columns
``u_i`` before normalisation, as in the reference library (peft 0.21.2), so a saved adapter means the
same in both.

``apply_GS=True`` orthonormalises the columns first (Gram-Schmidt, in column order) and uses
``H = I - 2 U Uᵀ``, the paper's orthogonality-regularised variant taken to its limit: then the order of
the reflections no longer matters, and ``H`` is its own inverse.

Which features turn (row vectors ``x``):

* ``nn.Linear``: the input, ``y = W (x Hᵀ)ᵀ + b``; merged weight ``W H``. The reflections are applied to
  ``x`` one by one (``x - 2 (x·u) uᵀ``, cost ``r`` per feature) instead of forming ``H``.
* ``nn.Conv2d``: each receptive field, flattened as ``(in_channels, *kernel)``: merged kernel
  ``W_flat H``; the unmerged forward convolves with that kernel.

Initialisation (``init_weights=True``, the reference's "symmetric" init): the columns come in equal
pairs (half of them drawn Kaiming-uniform, each repeated), and two equal reflections cancel, so a fresh
adapter leaves the model unchanged. That needs an even ``r``; with an odd ``r`` all columns are random
(the reference warns and does the same), and the model changes at once. With ``apply_GS`` no init can
start at the base (``I - 2 U Uᵀ`` has ``r`` eigenvalues -1), and Gram-Schmidt on equal pairs would only
normalise rounding noise (what the reference does); peftkit draws every column at random there.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..core import checks
from ..core.config import AdapterConfig, no_patterns_problems
from ..core.inject import trained_biases
from ..core.layer import AdapterModule, adapter_dtype
from ..core.registry import register_layer, register_method
from ..core.targeting import Target
from ..errors import UnsupportedLayerError
from .lora import LoraConfig

PEFT_TYPE = "HRA"


@register_method(PEFT_TYPE)
@dataclass
class HRAConfig(AdapterConfig):
    """Householder reflection adaptation: each targeted layer's inputs turn by ``r`` learned reflections.

    Attributes:
        r: Number of Householder reflections per layer (the reference default, 8). Even, for the
            default init to start at the base model.
        apply_GS: Orthonormalise the reflection vectors (Gram-Schmidt) and use ``I - 2 U Uᵀ``; needs
            ``r`` at most the layer's rotated features.
        init_weights: ``True``: the columns come in equal pairs, so the adapter starts as the identity
            (odd ``r``: random, with a warning, as the reference; with ``apply_GS``: random, since no
            init starts there at the base). ``False``: every column random (the adapter changes the
            output at once; for tests).
        bias: Base biases to train and save as well: "none", "all" or "hra_only" (adapted layers').
    """

    pick_when = "you want an orthogonal update from a chain of a few Householder reflections: fewer parameters than OFT, merges exactly"

    fields_not_in_format: ClassVar[tuple[str, ...]] = (
        "rank_pattern",
        "alpha_pattern",
    )  # not in the reference

    r: int = 8
    apply_GS: bool = False
    init_weights: bool = True
    bias: str = "none"

    # The reference library uses LoRA's defaults per architecture for HRA too.
    default_targets: ClassVar[dict[str, list[str]]] = LoraConfig.default_targets
    target_roles: ClassVar[tuple[str, ...]] = LoraConfig.target_roles
    own_default_types: ClassVar[tuple[str, ...]] = LoraConfig.own_default_types

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights and not self.apply_GS and isinstance(self.r, int) and self.r % 2:
            warnings.warn(
                f"HRA r={self.r} is odd: the symmetric init (pairs of equal reflections that cancel) needs an "
                "even r, so every reflection starts random and the adapted model no longer starts at the base "
                "model (as in the reference library). Use an even r.",
                stacklevel=3,
            )

    def problems(self) -> list[str]:
        out = super().problems()
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            out.append(f"r: the number of reflections must be a positive integer, got {self.r!r}")
        out += checks.booleans(self, "apply_GS", "init_weights")
        out += checks.bias_mode(self, "hra_only")
        out += no_patterns_problems(
            self,
            "HRA",
            "the reference format has no such field",
            "use one r for all targets, or inject separate adapters",
        )
        return out

    def layer_values(self, target: Target) -> dict[str, Any]:
        return {"r": int(self.r), "gram_schmidt": bool(self.apply_GS), "init": bool(self.init_weights)}

    def extra_trainable(self, model: nn.Module, adapted: list[str]) -> list[str]:
        return trained_biases(model, adapted, self.bias)


def _orthonormal(u: torch.Tensor) -> torch.Tensor:
    """Gram-Schmidt on the columns of ``u`` (features, r), in column order, as the reference does it
    (classical: each column minus its projections on the finished ones, one at a time)."""
    done = [u[:, :1] / u[:, 0].norm()]
    for i in range(1, u.shape[1]):
        col = u[:, i : i + 1]
        for q in done:
            col = col - (q.T @ col) * q
        done.append(col / col.norm())
    return torch.cat(done, dim=1)


class HRAAdapter(AdapterModule):
    """The reflections of one layer; a subclass says how its layer kind lays out the features that turn."""

    # The merged weight depends on the weight it is merged into (W H): the core refuses to merge it
    # beside other adapters on the same layer, where merged and unmerged outputs would differ.
    additive = False

    def __init__(self, features: int, like: torch.Tensor, r: int, gram_schmidt: bool, init: bool) -> None:
        super().__init__()
        if gram_schmidt and r > features:
            raise UnsupportedLayerError(
                f"apply_GS needs r <= the {features} features this layer turns (r orthonormal vectors), got "
                f"r={r}; lower r or set apply_GS=False"
            )
        self.gram_schmidt = gram_schmidt
        kw = {"device": like.device, "dtype": adapter_dtype(like)}
        if init and r % 2 == 0 and not gram_schmidt:
            # pairs of equal columns: two equal reflections cancel, so H = I at the start
            half = torch.empty(features, r // 2, **kw)
            nn.init.kaiming_uniform_(half, a=math.sqrt(5))
            u = torch.repeat_interleave(half, 2, dim=1)
        else:
            u = torch.empty(features, r, **kw)
            nn.init.kaiming_uniform_(u, a=math.sqrt(5))
        self.hra_u = nn.Parameter(u)

    def reflect(self, v: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """Row vectors ``v`` (..., features) times ``H`` (or ``Hᵀ``), without forming ``H``."""
        u = self.hra_u
        if self.gram_schmidt:  # H = I - 2 U Uᵀ is symmetric
            q = _orthonormal(u)
            return v - 2 * (v @ q) @ q.T
        u = u / u.norm(dim=0)
        # v H = v R_1 ... R_r applies R_1 first; v Hᵀ = v R_r ... R_1 applies R_r first
        order = range(u.shape[1] - 1, -1, -1) if transpose else range(u.shape[1])
        for i in order:
            col = u[:, i]
            v = v - 2 * (v @ col).unsqueeze(-1) * col
        return v

    # kind-specific: the weight as rows of turned features, and back
    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(weight.shape[0], -1)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        turned = self.reflect(self.rows(weight).to(self.hra_u.dtype))
        return turned.reshape(weight.shape).to(weight.dtype)

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        # H is orthogonal (exactly, up to rounding): its inverse is Hᵀ
        turned = self.reflect(self.rows(weight).to(self.hra_u.dtype), transpose=True)
        return turned.reshape(weight.shape).to(weight.dtype)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self.merged_weight(weight) - weight


class HRALinear(HRAAdapter):
    """HRA on ``nn.Linear``: the input turns, ``base(x Hᵀ)``, one call of the base layer."""

    transforms = "input"

    def __init__(self, base_layer: nn.Linear, **values: Any) -> None:
        super().__init__(base_layer.in_features, base_layer.weight, **values)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return self.reflect(x.to(self.hra_u.dtype), transpose=True).to(x.dtype)


class HRAConv2d(HRAAdapter):
    """HRA on ``nn.Conv2d``: each receptive field turns, i.e. the layer convolves with ``W_flat H``.

    The reference library sizes ``hra_u`` by ``in_channels * kernel_size[0]²`` and convolves with only
    the first padding and stride entries and no dilation; for square kernels with uniform padding and
    stride and no dilation both agree (see docs/hra.md).
    """

    def __init__(self, base_layer: nn.Conv2d, **values: Any) -> None:
        super().__init__(base_layer.weight[0].numel(), base_layer.weight, **values)

    def fused_output(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        weight = base_layer.weight
        turned = self.reflect(self.rows(weight).to(self.hra_u.dtype)).reshape(weight.shape).to(weight.dtype)
        return base_layer._conv_forward(x, turned, base_layer.bias)

    def delta_output(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return self.fused_output(x, base_layer) - base_out


def _conv_check(module: nn.Module) -> str | None:
    if module.groups != 1:
        return f"groups={module.groups} (grouped or depthwise convolution) is not supported by HRA"
    return None


register_layer(PEFT_TYPE, "Linear", (nn.Linear,), HRALinear)
register_layer(PEFT_TYPE, "Conv2d", (nn.Conv2d,), HRAConv2d, check=_conv_check)


__all__ = ["HRAConfig", "HRALinear", "HRAConv2d"]

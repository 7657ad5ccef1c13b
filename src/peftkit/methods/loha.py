"""LoHa: a low-rank Hadamard-product update (FedPara, Hyeon-Woo et al. 2021, arXiv:2108.06098; LyCORIS).

A frozen weight W (out x in) gets the update

    delta W = s * (W1a @ W1b) * (W2a @ W2b)        (* is elementwise, s = alpha / r)

with W1a, W2a (out x r) and W1b, W2b (r x in). The Hadamard product of two rank-r matrices can reach
rank r**2 (FedPara, section 3), so LoHa buys a higher-rank update for the parameters of a rank-2r LoRA.
W2b starts at zero, so a fresh adapter leaves the model unchanged.

Convolution kernels are treated as their (out, in * kernel) matrix, or, with ``use_effective_conv2d``,
each factor is a Tucker product: a small (r, r, kh, kw) core contracted with (r, out) and (r, in) mode
matrices (FedPara's "Proposition 3"), which keeps the parameter count from growing with the kernel.

This file also holds the pieces LoKr (``lokr.py``) shares with LoHa: the LyCORIS adapter base class
(a delta weight applied through the base layer's own operation, rank and module dropout), the
Tucker contraction and the shared config checks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import AdapterConfig
from ..core.layer import AdapterModule, adapter_dtype
from ..core.registry import register_layer, register_method
from ..core.targeting import Target
from .lora import LoraConfig

PEFT_TYPE = "LOHA"


# -- pieces shared with LoKr -----------------------------------------------------------------------


def lycoris_problems(config: Any, inits: tuple[Any, ...]) -> list[str]:
    """Checks common to the LyCORIS configs (LoHa and LoKr): rank, alpha, dropouts, flags."""
    out = []
    if isinstance(config.r, bool) or not isinstance(config.r, int) or config.r <= 0:
        out.append(f"r: must be a positive integer, got {config.r!r}")
    if isinstance(config.alpha, bool) or not isinstance(config.alpha, (int, float)) or config.alpha <= 0:
        out.append(f"alpha: must be a positive number, got {config.alpha!r}")
    for name in ("rank_dropout", "module_dropout"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            out.append(f"{name}: must be a probability in [0, 1), got {value!r}")
    if not isinstance(config.use_effective_conv2d, bool):
        out.append(f"use_effective_conv2d: must be True or False, got {config.use_effective_conv2d!r}")
    if not any(config.init_weights is i or (isinstance(i, str) and config.init_weights == i) for i in inits):
        out.append(f"init_weights: must be one of {', '.join(map(repr, inits))}; got {config.init_weights!r}")
    ranks = config.rank_pattern.values() if isinstance(config.rank_pattern, dict) else []
    if any(isinstance(v, float) and not float(v).is_integer() for v in ranks):
        out.append(f"rank_pattern: ranks must be whole numbers, got {config.rank_pattern!r}")
    return out


def tucker(core: torch.Tensor, mode_out: torch.Tensor, mode_in: torch.Tensor) -> torch.Tensor:
    """A (out, in, kh, kw) kernel from a (r, r, kh, kw) core and (r, out), (r, in) mode matrices."""
    return torch.einsum("ijhw,io,jn->onhw", core, mode_out, mode_in)


def kernel_core_shape(kernel: tuple[int, ...], r: int) -> tuple[int, ...]:
    """A Tucker core's shape; a Conv1d kernel gets a trailing 1 (the reference's 2-D layout)."""
    return (r, r, *kernel) if len(kernel) == 2 else (r, r, kernel[0], 1)


class LycorisAdapter(AdapterModule):
    """An adapter defined by a delta weight of the base layer's shape (LoHa, LoKr).

    The unmerged forward runs the base layer's own operation (``F.linear``, or the convolution with
    the base's stride, padding, dilation, groups and padding mode) with the delta weight; merging adds
    the same delta. A subclass implements :meth:`make_delta` (scaled, in the base weight's shape).

    Training-only regularisers, as in LyCORIS: ``module_dropout`` skips the whole adapter for a batch
    with that probability; ``rank_dropout`` zeroes whole output rows of the delta weight, rescaling
    the kept rows by ``1 / kept fraction`` when ``rank_dropout_scale`` is set.
    """

    rank_dropout_scale: bool = True

    def __init__(
        self, base_layer: nn.Module, r: int, alpha: float, rank_dropout: float, module_dropout: float
    ) -> None:
        super().__init__()
        weight = base_layer.weight
        self.r = r
        self.scaling = alpha / r
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.weight_shape = tuple(weight.shape)  # (out, in / groups, *kernel) for convolutions
        self.is_conv = isinstance(base_layer, nn.modules.conv._ConvNd)
        self._factory = {"device": weight.device, "dtype": adapter_dtype(weight)}

    def new_param(self, *shape: int) -> nn.Parameter:
        return nn.Parameter(torch.empty(shape, **self._factory))

    def make_delta(self) -> torch.Tensor:
        """The scaled delta weight in the base weight's shape, in the adapter's dtype."""
        raise NotImplementedError

    def _training_delta(self) -> torch.Tensor:
        delta = self.make_delta()
        if self.training and self.rank_dropout > 0:
            keep = (torch.rand(delta.shape[0], device=delta.device) > self.rank_dropout).to(delta.dtype)
            if self.rank_dropout_scale:  # an all-dropped mask stays zero instead of dividing by zero
                keep = keep / keep.mean().clamp_min(torch.finfo(delta.dtype).tiny)
            delta = delta * keep.view(-1, *[1] * (delta.dim() - 1))
        return delta

    def delta_output(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        if self.training and self.module_dropout > 0 and torch.rand(1).item() <= self.module_dropout:
            return torch.zeros_like(base_out)
        delta = self._training_delta()
        x = x.to(delta.dtype)
        # no bias: the base output already has it
        out = base_layer._conv_forward(x, delta, None) if self.is_conv else F.linear(x, delta)
        return out.to(base_out.dtype)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self.make_delta().to(weight.dtype)


# -- LoHa ------------------------------------------------------------------------------------------


@register_method(PEFT_TYPE)
@dataclass
class LoHaConfig(AdapterConfig):
    """LoHa: ``delta W = (alpha / r) * (W1a W1b) * (W2a W2b)``.

    Attributes:
        r: Rank of each of the two factors (per-module overrides via ``rank_pattern``).
        alpha: Scale numerator; the update is multiplied by ``alpha / r`` (``alpha_pattern`` overrides).
        rank_dropout: While training, the probability of zeroing each output row of the delta weight
            (kept rows are rescaled by the inverse of the kept fraction).
        module_dropout: While training, the probability of skipping the adapter for a whole batch.
        use_effective_conv2d: For Conv1d/Conv2d layers with a kernel larger than 1, build each factor
            from a (r, r, *kernel) Tucker core and two mode matrices instead of an
            (out, in * kernel) matrix product (FedPara, Proposition 3).
        init_weights: ``True``: W1a, W1b, W2a Kaiming-uniform and W2b zero, so the adapted model starts
            equal to the base; ``False``: all random (the adapter changes the output at once; for tests).
    """

    pick_when = "you want a higher-rank delta than LoRA's at the same parameter count (a Hadamard product of two low-rank pairs), e.g. diffusion models and convolutions"

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    init_weights: bool = True

    # The reference library's LoHa defaults are a copy of its LoRA ones (attention query and value),
    # and so are the roles found by structure on other architectures.
    default_targets: ClassVar[dict[str, list[str]]] = dict(LoraConfig.default_targets)
    target_roles: ClassVar[tuple[str, ...]] = LoraConfig.target_roles
    own_default_types: ClassVar[tuple[str, ...]] = LoraConfig.own_default_types

    def problems(self) -> list[str]:
        return super().problems() + lycoris_problems(self, inits=(True, False))

    def layer_values(self, target: Target) -> dict[str, Any]:
        return {
            "r": int(target.rank or self.r),
            "alpha": float(target.alpha or self.alpha),
            "rank_dropout": float(self.rank_dropout),
            "module_dropout": float(self.module_dropout),
            "effective_conv": bool(self.use_effective_conv2d),
            "init": self.init_weights,
        }


class LoHaAdapter(LycorisAdapter):
    """LoHa on ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d``.

    Tensors (the interchange names): ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b``, shaped
    (out, r), (r, in * kernel) for the matrix form and (r, out), (r, in) with the Tucker cores
    ``hada_t1``, ``hada_t2`` of shape (r, r, *kernel) in the effective-conv form.
    """

    def __init__(self, base_layer: nn.Module, *, effective_conv: bool, init: bool, **values: Any) -> None:
        super().__init__(base_layer, **values)
        out, fan_in, *kernel = self.weight_shape
        r = self.r
        # A 1x1 kernel is a plain matrix: the Tucker form would only add a core (the reference agrees).
        self.tucker = self.is_conv and effective_conv and math.prod(kernel) > 1
        if self.tucker:
            # parameter order: the first (hada_w1_a) feeds every entry of the delta
            self.hada_w1_a, self.hada_w1_b = self.new_param(r, out), self.new_param(r, fan_in)
            self.hada_w2_a, self.hada_w2_b = self.new_param(r, out), self.new_param(r, fan_in)
            self.hada_t1 = self.new_param(*kernel_core_shape(tuple(kernel), r))
            self.hada_t2 = self.new_param(*kernel_core_shape(tuple(kernel), r))
        else:
            cols = fan_in * math.prod(kernel)
            self.hada_w1_a, self.hada_w1_b = self.new_param(out, r), self.new_param(r, cols)
            self.hada_w2_a, self.hada_w2_b = self.new_param(out, r), self.new_param(r, cols)
        with torch.no_grad():
            for param in self.parameters():
                nn.init.kaiming_uniform_(param, a=math.sqrt(5))
            if init:  # one zero factor is enough for a zero product (FedPara uses He init for the rest)
                nn.init.zeros_(self.hada_w2_b)

    def make_delta(self) -> torch.Tensor:
        if self.tucker:
            first = tucker(self.hada_t1, self.hada_w1_a, self.hada_w1_b)
            second = tucker(self.hada_t2, self.hada_w2_a, self.hada_w2_b)
        else:
            first, second = self.hada_w1_a @ self.hada_w1_b, self.hada_w2_a @ self.hada_w2_b
        return (first * second * self.scaling).reshape(self.weight_shape)


register_layer(PEFT_TYPE, "Linear", (nn.Linear,), LoHaAdapter)
register_layer(PEFT_TYPE, "Conv1d", (nn.Conv1d,), LoHaAdapter)
register_layer(PEFT_TYPE, "Conv2d", (nn.Conv2d,), LoHaAdapter)


__all__ = ["LoHaConfig", "LoHaAdapter", "LycorisAdapter"]

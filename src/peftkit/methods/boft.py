"""BOFT: orthogonal finetuning by butterfly factorization (Liu et al. 2024, arXiv:2311.06243).

OFT turns a layer's input features by one block-diagonal orthogonal matrix, so features in different
blocks never mix. BOFT builds a dense orthogonal matrix from ``m = boft_n_butterfly_factor`` sparse ones,
as the butterfly of the Cooley-Tukey FFT does (the paper's section 4):

    M = B_(m-1) ... B_1 B_0        B_i = P_i blockdiag(Q_i1, ..., Q_iD) P_iᵀ

Every factor has ``D`` orthogonal ``b x b`` blocks (``D * b`` = the features that turn); ``P_i`` is the
block butterfly permutation that, within each group of ``b * 2^i`` features, puts the even half-blocks of
``b/2`` features before the odd ones, so that factor ``i`` mixes features ``b * 2^(i-1)`` apart and ``m``
factors mix groups of ``b * 2^(m-1)``. ``P_0`` is the identity: ``m = 1`` is OFT with dense blocks.

Each block is the exact Cayley transform of the skew part of a stored matrix:
``Q = (I - S)(I + S)^-1`` with ``S = (R - Rᵀ)/2``; ``boft_R`` stores all ``R`` as ``(m, D, b, b)``, as the
reference library (peft 0.21.2) does. A learned scale ``boft_s`` per output feature (the paper's
magnitude) multiplies the turned weight. With row vectors ``x``:

* ``nn.Linear``: ``y = s * (W (x M)ᵀ) + b``: the input turns, the output (without its bias) scales;
  merged weight ``diag(s) W Mᵀ``. ``boft_s`` has shape ``(out, 1)``.
* ``nn.Conv2d``: each receptive field, flattened as ``(in_channels, *kernel)``: the layer convolves with
  ``diag(s) W_flat Mᵀ``. ``boft_s`` has shape ``(1, out)``.

``R = 0`` and ``s = 1`` at the start, so a fresh adapter leaves the model unchanged. The products are
applied factor by factor to the vectors (cost ``m * b`` per feature), never as dense matrices.
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

PEFT_TYPE = "BOFT"


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@register_method(PEFT_TYPE)
@dataclass
class BOFTConfig(AdapterConfig):
    """Butterfly orthogonal finetuning: each targeted layer's inputs turn by a product of sparse rotations.

    Attributes:
        boft_block_size: Size ``b`` of each orthogonal block (the reference default, 4). Set exactly one of
            ``boft_block_size`` and ``boft_block_num``; the other must be 0.
        boft_block_num: Number ``D`` of blocks per factor instead (``D * b`` = the features that turn).
        boft_n_butterfly_factor: Number ``m`` of butterfly factors; 1 is OFT with dense blocks. Each extra
            factor doubles the span of features that mix; it needs ``b * 2^(m-1)`` to divide the features,
            and even ``b`` and ``D``.
        boft_dropout: While training, this fraction of the blocks of one random factor is set to the
            identity (BOFT's multiplicative dropout).
        fan_in_fan_out: In the reference format; BOFT adapts only layers storing (out, in), so False.
        bias: Base biases to train and save as well: "none", "all" or "boft_only" (adapted layers').
        init_weights: ``True``: ``R = 0`` and ``s = 1``, the model starts at the base. ``False``:
            ``R ~ N(0, 0.1²)``, ``s ~ N(1, 0.1²)`` (the adapter changes the output at once; for tests).
    """

    pick_when = "you want orthogonal fine-tuning (keeps the angles between pretrained neurons; robust to overfitting) with fewer parameters than OFT's blocks"

    fields_not_in_format: ClassVar[tuple[str, ...]] = (
        "rank_pattern",
        "alpha_pattern",
    )  # not in the reference

    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    boft_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True

    # The reference library uses LoRA's defaults per architecture for BOFT too.
    default_targets: ClassVar[dict[str, list[str]]] = LoraConfig.default_targets
    target_roles: ClassVar[tuple[str, ...]] = LoraConfig.target_roles
    own_default_types: ClassVar[tuple[str, ...]] = LoraConfig.own_default_types

    def problems(self) -> list[str]:
        out = super().problems()
        size, num = self.boft_block_size, self.boft_block_num
        for name, value in (("boft_block_size", size), ("boft_block_num", num)):
            if not (_whole(value) and value >= 0):
                out.append(
                    f"{name}: must be a non-negative integer (0 = derive it from the other), got {value!r}"
                )
        if _whole(size) and _whole(num) and (size == 0) == (num == 0):
            out.append(
                "set exactly one of boft_block_size and boft_block_num, the other to 0, since boft_block_size x "
                f"boft_block_num = the layer's input features; got boft_block_size={size}, boft_block_num={num}"
                + (
                    " (boft_block_size defaults to 4: pass boft_block_size=0 with boft_block_num)"
                    if num
                    else ""
                )
            )
        factor = self.boft_n_butterfly_factor
        if not (_whole(factor) and factor >= 1):
            out.append(f"boft_n_butterfly_factor: must be an integer >= 1 (1 = OFT), got {factor!r}")
        out += checks.dropout(self, "boft_dropout")
        out += checks.bias_mode(self, "boft_only")
        out += checks.booleans(self, "fan_in_fan_out", "init_weights")
        if self.fan_in_fan_out is True:
            out.append(
                "fan_in_fan_out: BOFT adapts nn.Linear and nn.Conv2d, whose weights are stored (out, in); "
                "leave it False (the reference resets it to False too)"
            )
        out += no_patterns_problems(
            self,
            "BOFT",
            "the reference format has no such field",
            "use one block configuration for all targets, or inject separate adapters",
        )
        return out

    def layer_values(self, target: Target) -> dict[str, Any]:
        return {
            "block_size": int(self.boft_block_size),
            "block_num": int(self.boft_block_num),
            "factors": int(self.boft_n_butterfly_factor),
            "dropout": float(self.boft_dropout),
            "init": bool(self.init_weights),
        }

    def matching_tensors(self, tensors: dict[str, torch.Tensor]) -> BOFTConfig:
        # The reference builds its butterfly only where its CUDA extension compiles; elsewhere it silently
        # uses one factor whatever the config says, and saves boft_R of shape (1, D, b, b) with the config's
        # boft_n_butterfly_factor. Such a file is a one-factor adapter: read it as one.
        stored = {int(t.shape[0]) for k, t in tensors.items() if k.endswith(".boft_R") and t.dim() == 4}
        if self.boft_n_butterfly_factor > 1 and stored == {1}:
            warnings.warn(
                f"the adapter's config says boft_n_butterfly_factor={self.boft_n_butterfly_factor} but its "
                "boft_R tensors hold one factor: it was trained by the reference library without its CUDA "
                "extension, which then uses one factor (plain block-diagonal OFT). Loading it as "
                "boft_n_butterfly_factor=1, which gives the outputs it was trained with.",
                stacklevel=3,
            )
            return self.replace(boft_n_butterfly_factor=1)
        return self

    def extra_trainable(self, model: nn.Module, adapted: list[str]) -> list[str]:
        return trained_biases(model, adapted, self.bias)


# -- the butterfly ---------------------------------------------------------------------------------


def _blocks_for(features: int, block_size: int, block_num: int, factors: int) -> tuple[int, int]:
    """(blocks per factor D, block size b) for ``features`` turned features, with the reference's checks."""
    given, name = (block_size, "boft_block_size") if block_num == 0 else (block_num, "boft_block_num")
    if given > features or features % given:
        raise UnsupportedLayerError(
            f"{name}={given} must divide the {features} input features this layer turns "
            f"(boft_block_size x boft_block_num = {features}); change {name} or exclude this module"
        )
    num, size = (features // given, given) if block_num == 0 else (given, features // given)
    if factors > 1:
        span = size * 2 ** (factors - 1)  # the features one group of the last factor mixes
        if features % span or num % 2 or size % 2 or factors - 1 > int(math.log2(num)):
            raise UnsupportedLayerError(
                f"boft_n_butterfly_factor={factors} with blocks of {size} needs an even block size, an even "
                f"number of blocks (here {num}), and blocks x 2^(factors - 1) = {span} to divide the {features} "
                "input features; use fewer factors or another block size, or exclude this module"
            )
    return num, size


def butterfly_permutation(features: int, block_size: int, level: int) -> torch.Tensor:
    """Indices ``p`` with ``(P v)[j] = v[p[j]]`` for the permutation ``P_level``: within each group of
    ``block_size * 2^level`` features, the half-blocks (``block_size / 2`` features) at even positions
    come first, then those at odd positions. Level 0 is the identity."""
    if level == 0:
        return torch.arange(features)
    group, half = block_size * 2**level, block_size // 2
    chunks = group // half
    order = torch.cat([torch.arange(0, chunks, 2), torch.arange(1, chunks, 2)])
    within = (order[:, None] * half + torch.arange(half)).flatten()
    return (torch.arange(0, features, group)[:, None] + within).flatten()


def _turn(v: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``v @ blockdiag(blocks)`` for row vectors ``v`` (..., D*b) and ``blocks`` (D, b, b)."""
    d, b, _ = blocks.shape
    return torch.einsum("...dk,dkc->...dc", v.reshape(*v.shape[:-1], d, b), blocks).reshape(v.shape)


class BOFTAdapter(AdapterModule):
    """Shared BOFT logic; a subclass says how its layer kind lays out the features that turn."""

    # The merged weight depends on the weight it is merged into: the core refuses to merge it beside
    # other adapters on the same layer, where merged and unmerged outputs would differ.
    additive = False
    scale_shape: str = "column"  # boft_s as (out, 1) (Linear) or (1, out) (Conv2d), as the reference saves it

    def __init__(
        self,
        features: int,
        out_features: int,
        like: torch.Tensor,
        block_size: int,
        block_num: int,
        factors: int,
        dropout: float,
        init: bool,
    ) -> None:
        super().__init__()
        self.num_blocks, self.block_size = _blocks_for(features, block_size, block_num, factors)
        self.dropout = dropout
        kw = {"device": like.device, "dtype": adapter_dtype(like)}
        self.boft_R = nn.Parameter(
            torch.zeros(factors, self.num_blocks, self.block_size, self.block_size, **kw)
        )
        shape = (out_features, 1) if self.scale_shape == "column" else (1, out_features)
        self.boft_s = nn.Parameter(torch.ones(shape, **kw))
        if not init:
            nn.init.normal_(self.boft_R, mean=0.0, std=0.1)
            nn.init.normal_(self.boft_s, mean=1.0, std=0.1)
        perms = torch.stack([butterfly_permutation(features, self.block_size, i) for i in range(factors)])
        self.register_buffer("perm", perms.to(like.device), persistent=False)
        self.register_buffer("unperm", perms.argsort(dim=1).to(like.device), persistent=False)

    def blocks(self, train: bool = False) -> torch.Tensor:
        """(factors, D, b, b): each factor's orthogonal blocks, by the exact Cayley transform. With
        ``train`` and boft_dropout, a fraction of one random factor's blocks is the identity."""
        r = self.boft_R
        skew = 0.5 * (r - r.transpose(-2, -1))
        eye = torch.eye(self.block_size, device=r.device, dtype=r.dtype).expand_as(skew)
        q = torch.linalg.solve(eye + skew, eye - skew, left=False)  # (I - S)(I + S)^-1
        if train and self.dropout > 0:
            mask = torch.zeros(q.shape[:2], device=q.device, dtype=q.dtype)
            dropped = torch.randperm(self.num_blocks, device=q.device)[: int(self.dropout * self.num_blocks)]
            mask[int(torch.randint(0, q.shape[0], (1,))), dropped] = 1
            mask = mask[..., None, None]
            q = (1 - mask) * q + mask * eye
        return q

    def rotate(self, v: torch.Tensor, blocks: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """Row vectors ``v`` times ``M`` (or ``Mᵀ``), factor by factor: ``v B_i = ((v P_i) Q_i) P_iᵀ``."""
        factors = range(blocks.shape[0]) if transpose else range(blocks.shape[0] - 1, -1, -1)
        for i in factors:
            q = blocks[i].transpose(-2, -1) if transpose else blocks[i]
            v = _turn(v[..., self.unperm[i]], q)[..., self.perm[i]]
        return v

    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(weight.shape[0], -1)

    def scale(self) -> torch.Tensor:
        """(out, 1): the learned scale of each output feature."""
        return self.boft_s if self.scale_shape == "column" else self.boft_s.T

    def turned_weight(self, weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """``diag(s) W_rows Mᵀ`` in the weight's shape and dtype."""
        turned = self.rotate(self.rows(weight).to(blocks.dtype), blocks, transpose=True) * self.scale()
        return turned.reshape(weight.shape).to(weight.dtype)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self.turned_weight(weight, self.blocks())

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        # M is orthogonal (an exact Cayley transform): W = diag(1/s) W' M
        rows = self.rows(weight).to(self.boft_R.dtype) / self.scale()
        return self.rotate(rows, self.blocks()).reshape(weight.shape).to(weight.dtype)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self.merged_weight(weight) - weight

    def delta_output(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return self.fused_output(x, base_layer) - base_out


class BOFTLinear(BOFTAdapter):
    """BOFT on ``nn.Linear``: the input turns (``x M``), the base runs once, its output less the bias scales."""

    def __init__(self, base_layer: nn.Linear, **values: Any) -> None:
        super().__init__(base_layer.in_features, base_layer.out_features, base_layer.weight, **values)

    def fused_output(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        blocks = self.blocks(self.training)
        turned = self.rotate(x.to(blocks.dtype), blocks).to(x.dtype)
        out = base_layer(turned)
        bias = base_layer.bias
        if bias is None:
            return (out * self.boft_s[:, 0]).to(out.dtype)
        return ((out - bias) * self.boft_s[:, 0] + bias).to(out.dtype)


class BOFTConv2d(BOFTAdapter):
    """BOFT on ``nn.Conv2d``: each receptive field turns, i.e. the layer convolves with ``diag(s) W_flat Mᵀ``.

    The reference library sizes the rotation by ``in_channels * kernel_size[0]²`` and convolves with only
    the first padding and stride entries and no dilation; for square kernels with uniform padding and
    stride and no dilation both agree (see docs/boft.md).
    """

    scale_shape = "row"

    def __init__(self, base_layer: nn.Conv2d, **values: Any) -> None:
        weight = base_layer.weight
        super().__init__(weight[0].numel(), base_layer.out_channels, weight, **values)

    def fused_output(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        turned = self.turned_weight(base_layer.weight, self.blocks(self.training))
        return base_layer._conv_forward(x, turned, base_layer.bias)


def _conv_check(module: nn.Module) -> str | None:
    if module.groups != 1:
        return f"groups={module.groups} (grouped or depthwise convolution) is not supported by BOFT"
    return None


register_layer(PEFT_TYPE, "Linear", (nn.Linear,), BOFTLinear)
register_layer(PEFT_TYPE, "Conv2d", (nn.Conv2d,), BOFTConv2d, check=_conv_check)


__all__ = ["BOFTConfig", "BOFTLinear", "BOFTConv2d", "butterfly_permutation"]

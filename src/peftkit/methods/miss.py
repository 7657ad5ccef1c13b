"""MiSS: matrix shard sharing (Kang and Yin, arXiv:2409.15371; it replaced Bone in the reference library).

MiSS cuts a linear layer's ``(out, in)`` weight into shards of ``r`` input columns and trains one small
matrix that every shard shares. Three forms (``init_weights``):

* balance (``True``, the default; ``False`` is the same with a random start): ``miss_block`` ``D`` of shape
  ``(r, out)``, and ``ΔW[o, i] = D[i mod r, o]``. The input is summed shard by shard (zero-padded to a
  multiple of ``r``) and the ``r`` sums multiply ``D``: ``y = W x + b + (Σ_k x_k) D`` with row vectors
  ``x_k`` of ``r`` features, the paper's efficient form (cost ``in + r * out`` per row). The delta does not
  depend on ``W``; it has rank at most ``r``.
* mini (``"mini"``): ``D`` of shape ``(r, mini_r)`` repeated along the outputs, ``ΔW[o, i] = D[i mod r,
  o mod mini_r]``: fewer parameters, ``out`` divisible by ``mini_r``.
* bat (``"bat"``): ``miss_block`` holds one ``r x r`` block ``B_p`` per block row ``p`` of ``W``, shape
  ``(out / r, r, r)``, and every ``r x r`` block of ``W`` changes with its own content:
  ``W'_pq = W_pq (I + B_p) + B_p``, so shards interact nonlinearly with the weight (both ``in`` and
  ``out`` divisible by ``r``). The layer runs with that weight (its ``transforms = "parameters"``); unmerge
  is ``W_pq = (W'_pq - B_p)(I + B_p)^-1``.

The stored tensor and its layout are the reference library's (peft 0.21.2), so a saved adapter means the
same in both. ``D = 0`` (and ``B = 0``) at the start: a fresh adapter leaves the model unchanged, except
with ``init_weights=False`` (Kaiming-uniform ``D``, for tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core import checks
from ..core.config import AdapterConfig, no_patterns_problems
from ..core.inject import trained_biases
from ..core.layer import AdapterModule, adapter_dtype
from ..core.registry import register_layer, register_method
from ..core.targeting import Target
from ..errors import UnsupportedLayerError
from .lora import LoraConfig

PEFT_TYPE = "MISS"
_INITS = (True, False, "bat", "mini")


@register_method(PEFT_TYPE)
@dataclass
class MissConfig(AdapterConfig):
    """Matrix shard sharing: each targeted linear layer's weight shards share one trained matrix.

    Attributes:
        r: Shard width along the input features (the reference default, 64); at most the layer's input
            features. With ``"bat"`` it is also the block size, dividing both input and output features.
        miss_dropout: Dropout on the adapter's input while training (balance and mini forms).
        mini_r: The ``"mini"`` form's width along the outputs (dividing the layer's output features).
        init_weights: ``True``: the balance form, starting at the base model. ``"bat"``: weight-dependent
            blocks. ``"mini"``: the balance form with ``mini_r`` output columns repeated. ``False``: the
            balance form with a random start (the adapter changes the output at once; for tests).
        bias: Base biases to train and save as well: "none", "all" or "MiSS_only" (adapted layers').
    """

    pick_when = "you want LoRA's parameter count with faster convergence: shards of one shared matrix added to the weight, on linear layers"

    fields_not_in_format: ClassVar[tuple[str, ...]] = (
        "rank_pattern",
        "alpha_pattern",
    )  # not in the reference

    r: int = 64
    miss_dropout: float = 0.0
    mini_r: int = 1
    init_weights: bool | str = True
    bias: str = "none"

    display_name: ClassVar[str] = "MiSS"

    # The reference library uses LoRA's defaults per architecture for MiSS too.
    default_targets: ClassVar[dict[str, list[str]]] = LoraConfig.default_targets
    target_roles: ClassVar[tuple[str, ...]] = LoraConfig.target_roles
    own_default_types: ClassVar[tuple[str, ...]] = LoraConfig.own_default_types

    def problems(self) -> list[str]:
        out = super().problems()
        out += checks.positive_ints(self, "r", "mini_r")
        out += checks.dropout(self, "miss_dropout")
        if not any(self.init_weights is i or (isinstance(i, str) and self.init_weights == i) for i in _INITS):
            out.append(
                f"init_weights: must be True (balance), 'bat', 'mini' or False (random), got {self.init_weights!r}"
            )
        # the reference accepts any "<name>_only" (its docs say "MiSS_only")
        if self.bias not in ("none", "all", "MiSS_only", "miss_only"):
            out.append(f"bias: must be 'none', 'all' or 'MiSS_only', got {self.bias!r}")
        out += no_patterns_problems(
            self,
            "MiSS",
            "the reference format has no such field",
            "use one r for all targets, or inject separate adapters",
        )
        return out

    def layer_values(self, target: Target) -> dict[str, Any]:
        init = self.init_weights
        form = init if isinstance(init, str) else "balance"
        return {
            "r": int(self.r),
            "form": form,
            "mini_r": int(self.mini_r),
            "dropout": float(self.miss_dropout),
            "random": init is False,
        }

    def extra_trainable(self, model: nn.Module, adapted: list[str]) -> list[str]:
        return trained_biases(model, adapted, self.bias)


class MissAdapter(AdapterModule):
    """The balance and mini forms on ``nn.Linear``: an additive delta shared by every input shard."""

    def __init__(
        self, base_layer: nn.Linear, r: int, form: str, mini_r: int, dropout: float, random: bool
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        if r > self.in_features:
            raise UnsupportedLayerError(
                f"MiSS r={r} is wider than this layer's {self.in_features} input features (a shard is r "
                "input columns); lower r"
            )
        if form == "mini" and self.out_features % mini_r:
            raise UnsupportedLayerError(
                f"MiSS 'mini' repeats mini_r={mini_r} columns over the {self.out_features} output features, "
                "which it must divide; choose a divisor"
            )
        self.r = r
        self.mini_r = mini_r if form == "mini" else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        kw = {"device": base_layer.weight.device, "dtype": adapter_dtype(base_layer.weight)}
        block = torch.zeros(r, mini_r if form == "mini" else self.out_features, **kw)
        if random:
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        self.miss_block = nn.Parameter(block)

    def shared(self) -> torch.Tensor:
        """``D`` as (r, out): the mini form's columns repeated along the outputs."""
        if self.mini_r is None:
            return self.miss_block
        return self.miss_block.repeat(1, self.out_features // self.mini_r)

    def delta_output(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        block = self.shared()
        x = self.dropout(x.to(block.dtype))
        pad = -x.shape[-1] % self.r  # the last shard is zero-padded, as its columns of ΔW are cut off
        if pad:
            x = F.pad(x, (0, pad))
        sums = x.reshape(*x.shape[:-1], -1, self.r).sum(dim=-2)
        return (sums @ block).to(base_out.dtype)

    def _selector(self, like: torch.Tensor) -> torch.Tensor:
        """(r, in): 1 where input feature i falls on shard column i mod r."""
        cols = torch.arange(self.in_features, device=like.device) % self.r
        return (cols == torch.arange(self.r, device=like.device).unsqueeze(1)).to(like.dtype)

    def delta_factors(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        block = self.shared()
        return block.T, self._selector(block)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        left, right = self.delta_factors(weight)
        return (left @ right).to(weight.dtype)


class MissBat(AdapterModule):
    """The bat form on ``nn.Linear``: each ``r x r`` block of the weight turns with its block row's matrix.

    The delta depends on the weight, so the layer runs the base with the merged weight itself
    (``transforms = "parameters"``: merged and unmerged agree exactly), and the core merges it only alone
    on its layer.
    """

    transforms = "parameters"
    additive = False

    def __init__(self, base_layer: nn.Linear, r: int, **_: Any) -> None:
        super().__init__()
        out_f, in_f = base_layer.out_features, base_layer.in_features
        if in_f % r or out_f % r:
            raise UnsupportedLayerError(
                f"MiSS 'bat' cuts the {out_f}x{in_f} weight into r x r blocks, so r={r} must divide both; "
                "choose such an r or the balance form (init_weights=True)"
            )
        self.r = r
        kw = {"device": base_layer.weight.device, "dtype": adapter_dtype(base_layer.weight)}
        self.miss_block = nn.Parameter(torch.zeros(out_f // r, r, r, **kw))

    def _blocks(self, weight: torch.Tensor) -> torch.Tensor:
        """(out, in) -> (out/r, in/r, r, r): block (p, q) is rows p*r.., columns q*r.."""
        out_f, in_f = weight.shape
        return weight.reshape(out_f // self.r, self.r, in_f // self.r, self.r).transpose(1, 2)

    @staticmethod
    def _unblock(blocks: torch.Tensor) -> torch.Tensor:
        rows, cols, r, _ = blocks.shape
        return blocks.transpose(1, 2).reshape(rows * r, cols * r)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        b = self.miss_block.to(weight.dtype).unsqueeze(1)  # one block per block row, for every column
        turned = self._blocks(weight) @ b + b
        return (weight + self._unblock(turned)).to(weight.dtype)

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        # block by block W' = W (I + B) + B, so W = (W' - B)(I + B)^-1; in float64, since I + B is only
        # as well conditioned as training left it
        b = self.miss_block.detach().to(torch.float64).unsqueeze(1)
        eye = torch.eye(self.r, dtype=torch.float64, device=weight.device)
        base = (self._blocks(weight.to(torch.float64)) - b) @ torch.linalg.inv(eye + b)
        return self._unblock(base).to(weight.dtype)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self.merged_weight(weight) - weight


def _build(base_layer: nn.Linear, *, form: str, **values: Any) -> AdapterModule:
    if form == "bat":
        return MissBat(base_layer, **values)
    return MissAdapter(base_layer, form=form, **values)


register_layer(PEFT_TYPE, "Linear", (nn.Linear,), _build)


__all__ = ["MissConfig", "MissAdapter", "MissBat"]

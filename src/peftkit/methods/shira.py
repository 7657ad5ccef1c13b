"""SHiRA: sparse high-rank adapters (Bhardwaj et al. 2024, "Sparse High Rank Adapters", arXiv:2406.13175).

A frozen weight W (out x in) gets an update that is nonzero on a fixed set M of positions only:

    W' = W + S,    S[i, j] = s_k  for the k-th position (i, j) of M,   S = 0 elsewhere

so training changes a few entries of W directly. The update is sparse but of high rank (a random M of
r * (in + out) positions touches almost every row and column), and because it is a plain sparse edit,
several SHiRA adapters can be switched or summed on a deployed model by writing only their entries.
The paper sizes M like a LoRA of rank r: |M| = r * (in + out) trainable numbers per layer.

The mask here is the paper's SHiRA-Rand, the reference library's ``mask_type="random"``: the first
r * (in + out) positions of a random permutation of the out * in flat positions (row = position // in,
column = position % in), drawn from a CPU generator seeded with ``random_seed`` (with no seed, a fresh
generator's fixed default seed, as the reference draws it). The positions are then sorted row-major, and
the k-th trainable value belongs to the k-th of them. Unlike FourierFT's, the positions are saved with the
values (``shira_indices``, int32, 2 x |M|: rows, then columns), so a file's mask is whatever it holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core import checks
from ..core.config import AdapterConfig
from ..core.layer import AdapterModule
from ..core.layer import adapter_dtype as _adapter_dtype
from ..core.registry import register_layer, register_method
from ..core.targeting import Target
from ..errors import UnsupportedLayerError
from .fourierft import no_rank_patterns
from .lora import LoraConfig

PEFT_TYPE = "SHIRA"


@register_method(PEFT_TYPE)
@dataclass
class ShiraConfig(AdapterConfig):
    """SHiRA: r * (in + out) entries of each adapted weight train, at fixed random positions.

    Attributes:
        r: Sizes the mask like a LoRA of rank r: r * (in + out) trained entries per layer. It does not
            limit the update's rank (a random sparse matrix is almost always of full rank).
        mask_type: How the mask is drawn; ``"random"`` (the paper's SHiRA-Rand) is the one the format
            knows. A saved adapter carries its positions, so loading never redraws them.
        random_seed: Seed of the random mask; ``None`` draws from a fresh generator's default seed, which
            is fixed too, so every layer of one shape gets the same positions either way.
        fan_in_fan_out: Recorded for the interchange format (SHiRA adapts ``nn.Linear`` only, so it is
            always False once saved).
        init_weights: ``True`` (default): the trained entries start at zero, the adapted model starts at
            the base. ``False``: N(0, 1) values (the reference uses that for tests only).
    """

    pick_when = "you switch or fuse adapters often: a sparse delta on 1-2 % of a weight's entries loads fast and interferes little with others"

    # a few entries of W train directly: rates in LoRA's range (the paper fine-tunes LLaMA at 1e-4 to 5e-4
    # with r = 32), a little higher since nothing multiplies the update
    lr_candidates: ClassVar[tuple[float, ...]] = (3e-4, 1e-3, 3e-3)
    # the reference ShiraConfig has no per-module patterns, excludes or layer selection
    fields_not_in_format: ClassVar[tuple[str, ...]] = (
        "rank_pattern",
        "alpha_pattern",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
    )
    display_name: ClassVar[str] = "SHiRA"

    r: int = 32
    mask_type: str = "random"
    random_seed: int | None = None
    fan_in_fan_out: bool = False
    init_weights: bool = True

    # The reference's defaults per architecture are its LoRA ones, except Phi, where it adapts only the
    # query and value projections (no fc1 / fc2).
    default_targets: ClassVar[dict[str, list[str]]] = {
        **LoraConfig.default_targets,
        "phi": ["q_proj", "v_proj"],
    }
    target_roles: ClassVar[tuple[str, ...]] = LoraConfig.target_roles
    own_default_types: ClassVar[tuple[str, ...]] = LoraConfig.own_default_types

    def problems(self) -> list[str]:
        out = super().problems()
        r = self.r
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            out.append(f"r: must be a positive integer (the mask holds r * (in + out) entries), got {r!r}")
        if self.mask_type != "random":
            out.append(
                f"mask_type: only 'random' is part of the interchange format, got {self.mask_type!r}; "
                "a saved adapter keeps its positions whatever mask drew them"
            )
        seed = self.random_seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            out.append(f"random_seed: must be an integer seed or None, got {seed!r}")
        out += checks.booleans(self, "fan_in_fan_out", "init_weights")
        return out + no_rank_patterns(self, "SHiRA", "r")

    def size_label(self) -> str:
        return f"SHiRA r={self.r}"

    def layer_values(self, target: Target) -> dict[str, Any]:
        return {"r": int(self.r), "seed": self.random_seed, "init_weights": bool(self.init_weights)}

    def after_resolve(self, plan: Any) -> ShiraConfig:
        # the reference flips fan_in_fan_out back to False on nn.Linear (with a warning): record it so
        return self.replace(fan_in_fan_out=False) if self.fan_in_fan_out else self


def random_mask_indices(out_features: int, in_features: int, count: int, seed: int | None) -> torch.Tensor:
    """The 2 x ``count`` (row, column) positions of a random mask, sorted row-major, as int32: the first
    ``count`` of a random permutation of the out * in flat positions (the reference's draw)."""
    generator = torch.Generator(device="cpu")
    if seed is not None:
        generator.manual_seed(seed)
    flat = torch.randperm(out_features * in_features, generator=generator)[:count].sort().values
    return torch.stack([flat // in_features, flat % in_features]).to(torch.int32)


class ShiraLinear(AdapterModule):
    """SHiRA on ``nn.Linear``.

    Interchange tensors: ``shira_weight`` (|M|,), the trained values, and ``shira_indices`` (2, |M|, int32),
    their (row, column) positions: a persistent buffer, saved and loaded with the values.
    """

    def __init__(self, base_layer: nn.Module, r: int, seed: int | None, init_weights: bool) -> None:
        super().__init__()
        weight = base_layer.weight
        self.out_features, self.in_features = weight.shape
        count = r * (self.in_features + self.out_features)
        if count > weight.numel():
            raise UnsupportedLayerError(
                f"r={r} asks for r * (in + out) = {count} trained entries, more than the {self.out_features} x "
                f"{self.in_features} = {weight.numel()} entries of this layer; lower r, or leave this layer out"
            )
        kw = {"device": weight.device, "dtype": _adapter_dtype(weight)}
        self.register_buffer(
            "shira_indices", random_mask_indices(*weight.shape, count, seed).to(weight.device)
        )
        values = torch.zeros(count, **kw) if init_weights else torch.randn(count, **kw)
        self.shira_weight = nn.Parameter(values)

    def sparse_delta(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """S as a dense out x in matrix. Repeated positions (only a hand-edited file has them) add up, as the
        reference's sparse tensor sums them."""
        rows, cols = self.shira_indices.to(device=device, dtype=torch.long)
        dense = torch.zeros(self.out_features, self.in_features, device=device, dtype=dtype)
        return dense.index_put(
            (rows, cols), self.shira_weight.to(device=device, dtype=dtype), accumulate=True
        )

    def delta_output(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        delta = self.sparse_delta(self.shira_weight.dtype, self.shira_weight.device)
        return F.linear(x.to(delta.dtype), delta).to(base_out.dtype)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self.sparse_delta(weight.dtype, weight.device)


register_layer(PEFT_TYPE, "Linear", (nn.Linear,), ShiraLinear)


__all__ = ["ShiraConfig", "ShiraLinear", "random_mask_indices"]

"""RandLoRA: full-rank updates from shared random bases (Albert et al. 2025, arXiv:2502.00987).

Like VeRA, the model keeps *frozen random* matrices shared by every adapted layer; unlike VeRA (one
rank-r pair), RandLoRA sums ``N = ceil(min(out, in) / r)`` rank-r random bases, so the update can reach
full rank while only small diagonal scales train (the paper's update, with one A shared by all bases):

    delta W = (alpha / r) * sum_n  B_n Λ_n A Γ_n        B_n: max x r (random), A: r x min (random, shared)
                                                         Λ_n: r (trained), Γ_n: min (trained)

The trained tensors of a layer are ``randlora_lambda`` (r x N: the Λ_n as columns) and ``randlora_gamma``
(N x min: the Γ_n as rows). A and all B_n are drawn once per adapter, sized for the largest target, and
each layer uses their leading slices. The scaled side is always the layer's *smaller* dimension: for a
layer with in <= out, ``delta W = B @ (Λ, Γ applied to A)`` (out x in); for in > out, the transpose of
the same product taken with the roles of in and out swapped (as the reference library does, to train
fewer numbers).

Interchange facts of the reference library (peft 0.21.2) that this file matches:

* Its flattening pairs the bases differently from the paper's sum: the scaled A is flattened rank-major
  (row ``i * N + n`` is rank i of base n) but the B side base-major (column ``n * r + i``), and the two
  are multiplied as they are. For N > 1 and r > 1 rank i of basis n of A meets some other column of B.
  The update is still a sum of rank-one products of random vectors with trained scales, just not the
  paper's pairing; peftkit pairs them the same way so that adapter files give the same outputs.
* The dense bases are Kaiming-uniform draws made in **bfloat16** (float16 on an accelerator without
  bfloat16) from a CPU generator seeded by ``projection_prng_key`` — A, then one (max x 1 x r) slab per
  basis — and each divided by its own standard deviation in that precision. peftkit always draws in
  bfloat16, which every CPU and current GPU gives; with ``save_projection=True`` (the default) the
  bases are in the file and nothing depends on this.
* With ``save_projection=True`` the bases are saved at model level (``base_model.randlora_A/B``) *and*
  once more under every adapted layer (``<module>.randlora_A/B``), the same tensors; peftkit writes and
  reads both (a load checks that the copies agree).
* ``init_weights=True`` sets Λ = 0 (the model starts at the base) and every Γ entry to ``1 / min``,
  while ``init_weights=False`` gives Λ ~ N(0, 1) and Γ = ``1 / max``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core import checks
from ..core.config import AdapterConfig, no_patterns_problems, with_layout_of
from ..core.inject import trained_biases
from ..core.layer import AdapterModule, ModelPart
from ..core.layer import adapter_dtype as _adapter_dtype
from ..core.registry import register_layer, register_method
from ..core.targeting import HFConv1D, Target
from ..errors import UnsupportedLayerError
from .lora import LoraConfig
from .vera import in_out, largest_in_out

PEFT_TYPE = "RANDLORA"
# Model-level keys of the shared bases in the interchange format; every layer also saves them under
# its own "<module>.randlora_A" / "<module>.randlora_B".
KEY_A = "base_model.randlora_A"
KEY_B = "base_model.randlora_B"


@register_method(PEFT_TYPE)
@dataclass
class RandLoraConfig(AdapterConfig):
    """RandLoRA: shared frozen random bases, trainable diagonal scales per layer and basis.

    Attributes:
        r: Rank of each random basis. Contrary to LoRA, a *smaller* r means *more* bases
            (``ceil(min(out, in) / r)``) and so more trained numbers per layer (``r·N + N·min``). One rank
            for the whole model: ``rank_pattern`` is not supported, since every layer slices the same bases.
        projection_prng_key: Seed of the generator that draws the bases, for new adapters and to rebuild
            them when they were not saved.
        save_projection: Save the bases with the adapter (bigger file, but loading does not depend on the
            random generator). With ``False`` they are regenerated from ``projection_prng_key``.
        sparse: Ternary bases (entries -1, 0, 1 with probabilities 1/6, 2/3, 1/6, scaled to unit standard
            deviation), the paper's sparse variant. Not faster here: the bases are still dense tensors.
        very_sparse: Ternary bases with ±1 each at probability ``1 / (2 sqrt(min))``; wins over ``sparse``
            when both are set, as in the reference.
        randlora_dropout: Dropout on the adapter's input during training.
        randlora_alpha: The update is scaled by ``randlora_alpha / r``; the reference's default 640 is
            20 times its default r. Large values can make training unstable at high learning rates.
        fan_in_fan_out: Recorded for the interchange format; the layout is read from the layer type
            (GPT-2's ``Conv1D`` stores its weight transposed) and recorded when saving.
        bias: Which base biases to train and save too: "none", "all", or "randlora_only" (biases of
            adapted layers). Trained biases are part of the base, so ``disable()`` cannot switch them off.
        init_weights: ``True``: Λ = 0 (starts at the base model). ``False``: Λ ~ N(0, 1), so the adapter
            changes the output at once (for tests).
    """

    pick_when = "you want full-rank updates at a small parameter count: learned scalings of frozen random bases shared by all layers"

    # the reference RandLoraConfig has no per-module patterns or exclude list
    fields_not_in_format: ClassVar[tuple[str, ...]] = ("rank_pattern", "alpha_pattern", "exclude_modules")

    r: int = 32
    projection_prng_key: int = 0
    save_projection: bool = True
    sparse: bool = False
    very_sparse: bool = False
    randlora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    randlora_alpha: float = 640
    bias: str = "none"
    init_weights: bool = True

    # The reference library's RandLoRA defaults per architecture are a copy of its LoRA table.
    default_targets: ClassVar[dict[str, list[str]]] = LoraConfig.default_targets
    target_roles: ClassVar[tuple[str, ...]] = LoraConfig.target_roles
    own_default_types: ClassVar[tuple[str, ...]] = LoraConfig.own_default_types
    display_name: ClassVar[str] = "RandLoRA"

    def problems(self) -> list[str]:
        out = super().problems()
        out += checks.positive_ints(self, "r")
        out += checks.seeds(self, "projection_prng_key")
        out += checks.booleans(
            self, "save_projection", "sparse", "very_sparse", "fan_in_fan_out", "init_weights"
        )
        out += checks.dropout(self, "randlora_dropout")
        out += checks.finite(self, "randlora_alpha", "the reference uses 20 * r")
        out += checks.bias_mode(self, "randlora_only")
        out += no_patterns_problems(
            self,
            "RandLoRA",
            "every layer slices the same shared bases of rank r",
            "remove {name}, or use LoRA for per-module ranks",
        )
        return out

    def layer_values(self, target: Target) -> dict[str, Any]:
        return {
            "r": int(self.r),
            "alpha": float(self.randlora_alpha),
            "dropout": float(self.randlora_dropout),
            "init_weights": bool(self.init_weights),
        }

    def after_resolve(self, plan: Any) -> RandLoraConfig:
        return with_layout_of(self, plan, HFConv1D)

    def build_part(self, model: nn.Module, plan: Any) -> RandLoraBases:
        # The bases are as large as the largest target in each dimension, as in the reference.
        in_max, out_max = largest_in_out(plan)
        bases = random_bases(self.r, out_max, in_max, self.projection_prng_key, self.sparse, self.very_sparse)
        return RandLoraBases(*bases, save_projection=self.save_projection)

    def extra_trainable(self, model: nn.Module, adapted: list[str]) -> list[str]:
        return trained_biases(model, adapted, self.bias)


# -- the shared bases ---------------------------------------------------------------------------------


def num_bases(min_dim: int, r: int) -> int:
    """How many rank-r bases reach full rank on a side of ``min_dim``: ceil(min_dim / r)."""
    return -(-min_dim // r)


def _ternary(uniform: torch.Tensor, sparsity: float) -> torch.Tensor:
    # -1 below 1/(2s), +1 above 1 - 1/(2s), else 0 (Li et al. 2006's sparse projections), unit std
    out = torch.zeros(uniform.shape)
    out[uniform < 1 / (2 * sparsity)] = -1
    out[uniform > 1 - 1 / (2 * sparsity)] = 1
    return out / out.std()


def random_bases(
    r: int, out_max: int, in_max: int, key: int, sparse: bool = False, very_sparse: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen RandLoRA bases drawn from seed ``key``, float32 on CPU, as the reference draws them.

    Returns:
        A of shape (r, 1, min_dim), shared by every basis, and B of shape (max_dim, N, r), where
        ``min_dim`` / ``max_dim`` are the smaller / larger of ``out_max`` and ``in_max`` and
        ``N = ceil(min_dim / r)``.
    """
    max_dim, min_dim = max(out_max, in_max), min(out_max, in_max)
    n = num_bases(min_dim, r)
    generator = torch.Generator(device="cpu").manual_seed(key)
    if very_sparse or sparse:
        sparsity = math.sqrt(min_dim) if very_sparse else 3
        a = torch.rand((r, 1, min_dim), generator=generator)
        b = torch.rand((max_dim, n, r), generator=generator)
        return _ternary(a, sparsity), _ternary(b, sparsity)

    def draw(shape: tuple[int, ...]) -> torch.Tensor:
        # torch's Kaiming-uniform with a = sqrt(5) (bound 1/sqrt(fan_in)), drawn in bfloat16 as the
        # reference draws it; the division by the std below makes the bound itself irrelevant
        return nn.init.kaiming_uniform_(
            torch.empty(shape, dtype=torch.bfloat16), a=math.sqrt(5), generator=generator
        )

    with torch.no_grad():
        a = draw((r, 1, min_dim))
        b = torch.cat([draw((max_dim, 1, r)) for _ in range(n)], dim=1)
        return (a / a.std()).float(), (b / b.std()).float()


class RandLoraBases(ModelPart):
    """The model-level part of one RandLoRA adapter: its shared bases, as buffers (frozen, moved by ``.to``).

    Layers read ``randlora_A`` / ``randlora_B`` from here at every forward and merge, never keeping their
    own reference, so ``model.to(device)`` and a load that overwrites them are seen at once.
    """

    # The part itself changes nothing; its layers' deltas are plain weight deltas.
    mergeable = True

    def __init__(self, randlora_a: torch.Tensor, randlora_b: torch.Tensor, save_projection: bool) -> None:
        super().__init__()
        self.register_buffer("randlora_A", randlora_a)
        self.register_buffer("randlora_B", randlora_b)
        self.save_projection = save_projection

    def interchange_state(self, portable: bool = False) -> dict[str, torch.Tensor]:
        if not self.save_projection:
            return {}
        return {KEY_A: self.randlora_A, KEY_B: self.randlora_B}


class _ScaledBasis(torch.autograd.Function):
    """``lam[:, :, None] * a * gam[None]`` (r x N x min) that keeps only its three small inputs for the
    backward pass, not the weight-sized product of the first two (the reference does the same)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, lam: torch.Tensor, gam: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, lam, gam)
        return lam[:, :, None] * a * gam[None]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor, torch.Tensor]:
        a, lam, gam = ctx.saved_tensors
        ga = grad * a.to(grad.dtype)  # r x N x min
        return None, (ga * gam.to(grad.dtype)).sum(-1), (ga * lam.to(grad.dtype)[:, :, None]).sum(0)


# -- the per-layer adapter ---------------------------------------------------------------------------


class RandLoraLinear(AdapterModule):
    """RandLoRA on ``nn.Linear`` and on transformers' GPT-2 ``Conv1D`` (weight stored as in x out).

    Interchange tensors: ``randlora_lambda`` (r, N) and ``randlora_gamma`` (N, min(in, out)); with saved
    projections also the shared ``randlora_A`` / ``randlora_B``, as the reference writes them per layer.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float,
        init_weights: bool,
        part: RandLoraBases,
    ) -> None:
        super().__init__()
        weight = base_layer.weight
        self.transposed = not isinstance(base_layer, nn.Linear)
        self.in_features, self.out_features = in_out(base_layer)
        self.min_dim = min(self.in_features, self.out_features)
        self.max_dim = max(self.in_features, self.out_features)
        self.num_bases = num_bases(self.min_dim, r)
        _check_fits(part, r, self.num_bases, self.min_dim, self.max_dim)
        # A plain attribute, not a submodule: the part is registered once on the model, and its
        # buffers must not reappear among every layer's adapter tensors.
        object.__setattr__(self, "_part", part)
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        kw = {"device": weight.device, "dtype": _adapter_dtype(weight)}
        shape_lambda, shape_gamma = (r, self.num_bases), (self.num_bases, self.min_dim)
        if init_weights:
            self.randlora_lambda = nn.Parameter(torch.zeros(shape_lambda, **kw))
            self.randlora_gamma = nn.Parameter(torch.full(shape_gamma, 1 / max(shape_gamma), **kw))
        else:
            self.randlora_lambda = nn.Parameter(torch.randn(shape_lambda, **kw))
            self.randlora_gamma = nn.Parameter(torch.full(shape_gamma, 1 / self.max_dim, **kw))

    def interchange_state(self, portable: bool = False) -> dict[str, torch.Tensor]:
        state = dict(self.state_dict())
        part: RandLoraBases = self._part
        if part.save_projection:  # the same tensors as the model-level keys (see the module docstring)
            state.update(randlora_A=part.randlora_A, randlora_B=part.randlora_B)
        return state

    def _factors(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(first, second) with ``delta W = scaling * second @ first``: (k x in) and (out x k), k = r·N."""
        part: RandLoraBases = self._part
        lam, gam = self.randlora_lambda.to(like.dtype), self.randlora_gamma.to(like.dtype)
        a = part.randlora_A[:, :, : self.min_dim].to(device=like.device, dtype=like.dtype)
        b = part.randlora_B[: self.max_dim, : self.num_bases, :].to(device=like.device, dtype=like.dtype)
        scaled = _ScaledBasis.apply(a, lam, gam).flatten(0, 1)  # rank-major: row i*N + n
        wide = b.flatten(1)  # basis-major: column n*r + i (the reference's pairing, see above)
        if self.min_dim == self.in_features:
            return scaled, wide  # (k x in), (out x k)
        return wide.T, scaled.T  # (k x in), (out x k): in > out, the scaled side is the output

    def delta_output(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        first, second = self._factors(self.randlora_lambda)
        xd = self.dropout(x.to(first.dtype))
        # two thin matmuls through the k = r·N bases, never the out x in product
        return (F.linear(F.linear(xd, first), second) * self.scaling).to(base_out.dtype)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        first, second = self._factors(weight)
        delta = (second @ first) * self.scaling  # out x in
        return delta.T if self.transposed else delta


def _check_fits(part: RandLoraBases, r: int, n: int, min_dim: int, max_dim: int) -> None:
    shape_a, shape_b = tuple(part.randlora_A.shape), tuple(part.randlora_B.shape)
    problems = []
    if shape_a[0] != r or shape_b[2] != r:
        problems.append(f"rank r={r} but the shared bases have rank {shape_a[0]}")
    if min_dim > shape_a[2]:
        problems.append(f"smaller side {min_dim} > the shared A's {shape_a[2]} columns")
    if max_dim > shape_b[0] or n > shape_b[1]:
        problems.append(f"larger side {max_dim} with {n} bases > the shared B's {shape_b[0]} x {shape_b[1]}")
    if problems:
        raise UnsupportedLayerError(
            f"does not fit the adapter's shared RandLoRA bases A {shape_a} / B {shape_b}: "
            + "; ".join(problems)
            + ". The bases are sized for the targets of one inject; adapt all layers of different sizes "
            "in the same inject call."
        )


register_layer(PEFT_TYPE, "Linear", (nn.Linear,), RandLoraLinear)
if HFConv1D:
    register_layer(PEFT_TYPE, "Conv1D (GPT-2)", (HFConv1D,), RandLoraLinear)


__all__ = ["RandLoraBases", "RandLoraConfig", "RandLoraLinear", "num_bases", "random_bases"]

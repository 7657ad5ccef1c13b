"""VeRA: vector-based random matrix adaptation (Kopiczko et al. 2024, arXiv:2310.11454).

One pair of *frozen random* matrices is shared by every adapted layer of the model: A (r x in_max) and
B (out_max x r), where in_max / out_max are the largest input / output sizes among the targets. Each
layer trains only two vectors, d (r) and b (out), and adds (paper, eq. 2)

    delta h = Lambda_b B Lambda_d A x        Lambda = diag(vector)

using the top-left slice of the shared matrices for its own size: A[:, :in] and B[:out, :]. b starts
at zero, so the adapted model starts at the base; d starts at a small constant ``d_initial`` (the paper's
Table 6c finds values <= 0.1 train best).

The shared matrices live in a :class:`~peftkit.core.layer.ModelPart` (as buffers: never trained, moved
by ``model.to()``), and are either saved with the adapter (``save_projection=True``) or regenerated
from ``projection_prng_key`` exactly as the reference library generates them.
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

PEFT_TYPE = "VERA"
# Model-level keys of the shared projections in the interchange format (they are not per layer).
KEY_A = "base_model.vera_A"
KEY_B = "base_model.vera_B"


@register_method(PEFT_TYPE)
@dataclass
class VeraConfig(AdapterConfig):
    """VeRA: shared frozen random projections, trainable per-layer scaling vectors.

    Attributes:
        r: Rows of the shared A (columns of B). VeRA trains only ``r + out`` numbers per layer, so ranks
            far above LoRA's are normal (the paper uses 256 and up). One rank for the whole model:
            ``rank_pattern`` is not supported, since every layer slices the same A and B.
        projection_prng_key: Seed of the generator that draws A and B (Kaiming-uniform, as the
            reference library does), used for new adapters and to rebuild them when not saved.
        save_projection: Save A and B with the adapter (bigger file, but loading does not depend on the
            random generator). With ``False`` they are regenerated from ``projection_prng_key``.
        vera_dropout: Dropout on the adapter's input during training.
        d_initial: Initial value of every entry of d.
        fan_in_fan_out: Recorded for the interchange format; peftkit reads the layout from the layer
            type (GPT-2's ``Conv1D`` stores its weight transposed) and records it when saving.
        bias: Which base biases to train and save too: "none", "all", or "vera_only" (biases of
            adapted layers). Trained biases are part of the base, so ``disable()`` cannot switch them off.
        init_weights: ``True``: b = 0, d = ``d_initial`` (starts at the base model). ``False``: b = 1,
            d ~ N(0, 1) (the adapter changes the output at once; for tests).
    """

    pick_when = "you keep many adapters per base: two scaling vectors per layer around frozen random matrices shared by all layers, far fewer parameters than LoRA"

    lr_candidates: ClassVar[tuple[float, ...]] = (
        3e-3,
        1e-2,
        3e-2,
    )  # VeRA trains only scaling vectors: its paper uses 1e-2 and above

    # the reference VeraConfig has no per-module patterns or exclude list
    fields_not_in_format: ClassVar[tuple[str, ...]] = ("rank_pattern", "alpha_pattern", "exclude_modules")

    r: int = 256
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True

    # The reference library's VeRA defaults are its LoRA defaults (attention query and value), except for
    # Phi, where VeRA keeps to attention; other architectures get the same roles, found by structure.
    default_targets: ClassVar[dict[str, list[str]]] = {
        **LoraConfig.default_targets,
        "phi": ["q_proj", "v_proj"],
    }
    target_roles: ClassVar[tuple[str, ...]] = LoraConfig.target_roles
    own_default_types: ClassVar[tuple[str, ...]] = LoraConfig.own_default_types

    def problems(self) -> list[str]:
        out = super().problems()
        out += checks.positive_ints(self, "r")
        out += checks.seeds(self, "projection_prng_key")
        out += checks.booleans(self, "save_projection", "fan_in_fan_out", "init_weights")
        out += checks.dropout(self, "vera_dropout")
        out += checks.finite(self, "d_initial", "the paper recommends <= 0.1")
        out += checks.bias_mode(self, "vera_only")
        out += no_patterns_problems(
            self,
            "VeRA",
            "every layer slices the same shared A and B of rank r",
            "remove {name}, or use LoRA for per-module ranks",
        )
        return out

    def layer_values(self, target: Target) -> dict[str, Any]:
        return {
            "r": int(self.r),
            "dropout": float(self.vera_dropout),
            "d_initial": float(self.d_initial),
            "init_weights": bool(self.init_weights),
        }

    def after_resolve(self, plan: Any) -> VeraConfig:
        return with_layout_of(self, plan, HFConv1D)

    def build_part(self, model: nn.Module, plan: Any) -> VeraProjections:
        # The shared matrices are as large as the largest target in each dimension (section 3.1).
        in_max, out_max = largest_in_out(plan)
        return VeraProjections(self.r, in_max, out_max, self.projection_prng_key, self.save_projection)

    def extra_trainable(self, model: nn.Module, adapted: list[str]) -> list[str]:
        return trained_biases(model, adapted, self.bias)


# -- the shared projections ---------------------------------------------------------------------------


def in_out(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a Linear (weight out x in) or GPT-2 Conv1D (weight in x out)."""
    rows, cols = module.weight.shape
    return (cols, rows) if isinstance(module, nn.Linear) else (rows, cols)


def largest_in_out(plan: Any) -> tuple[int, int]:
    """The largest (in, out) over the planned targets, each dimension on its own: the size of the shared
    matrices that every target slices (VeRA, RandLoRA)."""
    sizes = [in_out(t.module) for t in plan.targets]
    return max(s[0] for s in sizes), max(s[1] for s in sizes)


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    # Kaiming-uniform for a ReLU gain (fan_in = shape[1]): U(-b, b), b = sqrt(3) * sqrt(2) / sqrt(fan_in).
    # Drawn from an explicit CPU generator so the same key gives the same matrices everywhere, and the
    # same as the reference library's (which draws A, then B, from one generator seeded by the key).
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape, device="cpu").uniform_(-bound, bound, generator=generator)


def shared_projections(r: int, in_max: int, out_max: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen VeRA matrices A (r x in_max) and B (out_max x r) drawn from seed ``key``, float32 on CPU."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    vera_a = _kaiming_uniform((r, in_max), generator)
    vera_b = _kaiming_uniform((out_max, r), generator)
    return vera_a, vera_b


class VeraProjections(ModelPart):
    """The model-level part of one VeRA adapter: its shared A and B, as buffers (frozen, moved by ``.to``).

    Layers read ``vera_A`` / ``vera_B`` from here at every forward and merge, never keeping their own
    reference, so ``model.to(device)`` and a load that overwrites them are seen at once.
    """

    # The part itself changes nothing; its layers' deltas are plain weight deltas.
    mergeable = True

    def __init__(self, r: int, in_max: int, out_max: int, key: int, save_projection: bool) -> None:
        super().__init__()
        vera_a, vera_b = shared_projections(r, in_max, out_max, key)
        self.register_buffer("vera_A", vera_a)
        self.register_buffer("vera_B", vera_b)
        self.save_projection = save_projection

    def interchange_state(self, portable: bool = False) -> dict[str, torch.Tensor]:
        if not self.save_projection:
            return {}
        return {KEY_A: self.vera_A, KEY_B: self.vera_B}


# -- the per-layer adapter ---------------------------------------------------------------------------


class VeraLinear(AdapterModule):
    """VeRA on ``nn.Linear`` and on transformers' GPT-2 ``Conv1D`` (weight stored as in x out).

    Interchange tensors: ``vera_lambda_b`` (out,) and ``vera_lambda_d`` (r,).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        dropout: float,
        d_initial: float,
        init_weights: bool,
        part: VeraProjections,
    ) -> None:
        super().__init__()
        weight = base_layer.weight
        self.transposed = not isinstance(base_layer, nn.Linear)
        self.in_features, self.out_features = in_out(base_layer)
        _check_fits(part, r, self.in_features, self.out_features)
        # A plain attribute, not a submodule: the part is registered once on the model, and its
        # buffers must not reappear among every layer's adapter tensors.
        object.__setattr__(self, "_part", part)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        kw = {"device": weight.device, "dtype": _adapter_dtype(weight)}
        if init_weights:
            self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, **kw))
            self.vera_lambda_d = nn.Parameter(torch.full((r,), float(d_initial), **kw))
        else:
            self.vera_lambda_b = nn.Parameter(torch.ones(self.out_features, **kw))
            self.vera_lambda_d = nn.Parameter(torch.randn(r, **kw))

    def _slices(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's top-left slices of the shared A (r x in) and B (out x r), as ``like``'s dtype/device."""
        part: VeraProjections = self._part
        vera_a = part.vera_A[:, : self.in_features].to(device=like.device, dtype=like.dtype)
        vera_b = part.vera_B[: self.out_features, :].to(device=like.device, dtype=like.dtype)
        return vera_a, vera_b

    def delta_output(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        lambda_b, lambda_d = self.vera_lambda_b, self.vera_lambda_d
        vera_a, vera_b = self._slices(lambda_d)
        xd = self.dropout(x.to(lambda_d.dtype))
        # b * (B (d * (A x))): two thin matmuls, never the out x in product.
        return (lambda_b * F.linear(lambda_d * F.linear(xd, vera_a), vera_b)).to(base_out.dtype)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        lambda_b = self.vera_lambda_b.to(device=weight.device, dtype=weight.dtype)
        lambda_d = self.vera_lambda_d.to(device=weight.device, dtype=weight.dtype)
        vera_a, vera_b = self._slices(weight)
        delta = (lambda_b[:, None] * vera_b) @ (lambda_d[:, None] * vera_a)  # out x in
        return delta.T if self.transposed else delta


def _check_fits(part: VeraProjections, r: int, in_features: int, out_features: int) -> None:
    shape_a, shape_b = tuple(part.vera_A.shape), tuple(part.vera_B.shape)
    problems = []
    if shape_a[0] != r or shape_b[1] != r:
        problems.append(f"rank r={r} but the shared matrices have rank {shape_a[0]}")
    if in_features > shape_a[1]:
        problems.append(f"input size {in_features} > the shared A's {shape_a[1]} columns")
    if out_features > shape_b[0]:
        problems.append(f"output size {out_features} > the shared B's {shape_b[0]} rows")
    if problems:
        raise UnsupportedLayerError(
            f"does not fit the adapter's shared VeRA projections A {shape_a} / B {shape_b}: "
            + "; ".join(problems)
            + ". The projections are sized for the targets of one inject; adapt all layers of different "
            "sizes in the same inject call."
        )


register_layer(PEFT_TYPE, "Linear", (nn.Linear,), VeraLinear)
if HFConv1D:
    register_layer(PEFT_TYPE, "Conv1D (GPT-2)", (HFConv1D,), VeraLinear)


__all__ = ["VeraConfig", "VeraLinear", "VeraProjections", "in_out", "largest_in_out", "shared_projections"]

"""BitFit: train only the bias terms (Ben Zaken, Ravfogel and Goldberg 2022, arXiv:2106.10199).

The paper fine-tunes every bias of a BERT model (attention projections, feed-forward layers and
LayerNorm shifts) and nothing else, about 0.08% of the parameters. Here each adapted module gets a
trainable *delta* ``d`` of its bias's shape, initialised to zero, so that:

- the output is ``base(x) + d`` broadcast over the output's channel dimension, which starts exactly at
  the base model, and ``disable()`` gives the base exactly (the base bias itself is never trained);
- several BitFit adapters can sit on one layer and their deltas add up;
- merging writes ``b + d`` into the base bias (``merge_into = ("bias",)``), unmerging ``b - d``.

peftkit's own format (the reference library has no BitFit): ``peft_type: "BITFIT"``, one tensor per
adapted module saved as ``base_model.model.<module>.bias_delta``, of the module's bias shape.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from ..core.config import AdapterConfig
from ..core.layer import AdapterModule
from ..core.layer import adapter_dtype as _adapter_dtype
from ..core.registry import register_layer, register_method
from ..core.targeting import HFConv1D, Target, user_modules
from ..errors import NoTargetMatchedError

PEFT_TYPE = "BITFIT"

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# Layers that normalise their input and then shift it by a bias (LayerNorm's beta, BatchNorm's shift).
_NORMS = (nn.LayerNorm, nn.GroupNorm, _NormBase)


def _has_bias(module: nn.Module) -> bool:
    return isinstance(module._parameters.get("bias"), nn.Parameter)


def is_norm_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer (torch's, or a class named ``...Norm``)."""
    return isinstance(module, _NORMS) or type(module).__name__.endswith("Norm")


@register_method(PEFT_TYPE)
@dataclass
class BitFitConfig(AdapterConfig):
    """BitFit: a trainable bias delta on every adapted module.

    Attributes:
        target_modules: ``None`` (default) adapts every module that holds a bias (the paper's setting);
            a list of names or a regex restricts it, ``"all-linear"`` takes the linear layers' biases.
            A module named explicitly that has no bias is refused; one picked up by a regex is skipped
            and listed by ``trainable_summary``.
        include_norm_biases: With ``target_modules=None``, also adapt the biases (shifts) of
            normalisation layers (LayerNorm, GroupNorm, BatchNorm). The paper trains them; set False
            to train only the biases of linear and convolution layers. Explicit targets ignore it.
    """

    pick_when = (
        "you want the smallest possible baseline (biases only, merges for free) on a base that has biases"
    )

    lr_candidates: ClassVar[tuple[float, ...]] = (
        1e-3,
        3e-3,
        1e-2,
    )  # the BitFit paper searched 1e-4 to 1e-3 over long runs; short budgets need more

    include_norm_biases: bool = True

    def problems(self) -> list[str]:
        out = super().problems()
        if not isinstance(self.include_norm_biases, bool):
            out.append(f"include_norm_biases: must be True or False, got {self.include_norm_biases!r}")
        for name in ("rank_pattern", "alpha_pattern"):
            if getattr(self, name):
                out.append(
                    f"{name}: BitFit has no rank or alpha (a bias delta has the bias's shape); leave it empty"
                )
        return out

    def default_target_spec(self, model: nn.Module) -> str:
        # The selection depends on which modules hold a bias, not on the architecture: an exact regex of
        # their names, so exclude_modules, modules_to_save and layers_to_transform apply as usual.
        names = [
            name
            for name, module in user_modules(model)
            if name and _has_bias(module) and (self.include_norm_biases or not is_norm_layer(module))
        ]
        if not names:
            norms = "" if self.include_norm_biases else " (norm layers excluded by include_norm_biases=False)"
            raise NoTargetMatchedError(
                f"BitFit found no module with a bias in {type(model).__name__}{norms}. Models built without "
                "biases (e.g. Llama-style decoders) cannot be BitFit-tuned; choose another method, such as "
                "LN tuning or LoRA."
            )
        return "(?:" + "|".join(re.escape(n) for n in names) + ")"

    def layer_values(self, target: Target) -> dict[str, Any]:
        return {}


class BitFitBias(AdapterModule):
    """A trainable delta on one module's bias, added to the output along its channel dimension.

    ``trailing`` says how the bias lines up with the output: ``"last"`` (Linear, Conv1D, LayerNorm,
    whose bias covers the last dimension(s)), an int k (a k-d convolution: the channel dimension is
    followed by k spatial ones, batched or not) or ``"channels"`` (BatchNorm / GroupNorm: channels are
    dimension 1 of an input with any number of trailing dimensions).
    """

    merge_into = ("bias",)

    def __init__(self, base_layer: nn.Module, trailing: str | int) -> None:
        super().__init__()
        bias = base_layer.bias
        self.trailing = trailing
        self.bias_delta = nn.Parameter(
            torch.zeros(bias.shape, dtype=_adapter_dtype(bias), device=bias.device)
        )

    def delta_output(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        ones = (
            base_out.dim() - 2
            if self.trailing == "channels"
            else 0
            if self.trailing == "last"
            else self.trailing
        )
        return self.bias_delta.to(base_out.dtype).reshape(*self.bias_delta.shape, *([1] * ones))

    def merged_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"bias": tensors["bias"] + self.bias_delta.to(tensors["bias"].dtype)}

    def unmerged_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"bias": tensors["bias"] - self.bias_delta.to(tensors["bias"].dtype)}


def _needs_bias(module: nn.Module) -> str | None:
    if not _has_bias(module):
        return f"{type(module).__name__} has no bias (built with bias=False or without an affine shift)"
    return None


def _builder(trailing: str | int):
    def build(base_layer: nn.Module) -> BitFitBias:
        k = len(base_layer.kernel_size) if trailing == "conv" else trailing
        return BitFitBias(base_layer, k)

    return build


register_layer(PEFT_TYPE, "Linear", (nn.Linear,), _builder("last"), check=_needs_bias)
if HFConv1D:
    register_layer(PEFT_TYPE, "Conv1D (GPT-2)", (HFConv1D,), _builder("last"), check=_needs_bias)
register_layer(PEFT_TYPE, "Conv", _CONVS, _builder("conv"), check=_needs_bias)
register_layer(PEFT_TYPE, "LayerNorm", (nn.LayerNorm,), _builder("last"), check=_needs_bias)
register_layer(
    PEFT_TYPE,
    "BatchNorm / GroupNorm",
    (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm),
    _builder("channels"),
    check=_needs_bias,
)


__all__ = ["BitFitConfig", "BitFitBias", "is_norm_layer"]

"""LoRA on ``nn.Parameter`` tensors (``LoraConfig.target_parameters``): stacked MoE experts and routers.

Since transformers 5 the experts of Qwen3-MoE, Mixtral, OLMoE ... are 3-D parameters of one module,
(experts, out, in), and the router a module holding a 2-D (experts, hidden) weight: no linear layer to
wrap. Each targeted parameter gets a low-rank delta per expert, and the core calls the module with
``W + delta`` (``core.layer.ParameterAdapter``), so whatever the module does with ``W`` sees the change.

The tensors have the reference library's layout (its ``ParamWrapper``, PR #2638), so files interchange:

* ``lora_A.weight`` is (r * experts, in): rows ``e * r ... e * r + r - 1`` are expert ``e``'s A;
* ``lora_B.weight`` is (out, r * experts): column ``k * experts + e`` is rank ``k`` of expert ``e``'s B;
* expert ``e``'s delta is ``scaling * B_e @ A_e`` (out x in), transposed into a stack the module stores
  (experts, in, out) (``is_transposed``); a 2-D parameter is the one-expert case, ``(out, in)``.
* Several parameters of one module are saved as the reference nests its wrappers: the parameter
  registered last on the module owns ``<module>.lora_A.weight``, the one before it
  ``<module>.base_layer.lora_A.weight``, and so on (``mlp.experts.lora_A.weight`` is ``down_proj``'s,
  ``mlp.experts.base_layer.lora_A.weight`` ``gate_up_proj``'s on Qwen3-MoE).

Dropout, DoRA and the SVD inits are refused, as in the reference: the delta is added to the weight, not
computed from an input, and a stack of experts is not one matrix to decompose.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..core import moe
from ..core.layer import ParameterAdapter, adapter_dtype
from ..errors import UnsupportedLayerError


class LoraParameter(nn.Module):
    """The low-rank delta of one parameter, per expert for a 3-D stack."""

    def __init__(
        self, module: nn.Module, name: str, r: int, alpha: float, use_rslora: bool, init: Any
    ) -> None:
        super().__init__()
        param = getattr(module, name)
        self.experts, d_in, d_out = moe.stack_layout(module, tuple(param.shape))
        self.r = r
        self.ndim = param.dim()
        self.transposed = self.ndim == 3 and bool(getattr(module, "is_transposed", False))
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        kw = {"bias": False, "device": param.device, "dtype": adapter_dtype(param)}
        # nn.Linear only as holders, for the reference's key names (lora_A.weight) and shapes
        self.lora_A = nn.Linear(d_in, r * self.experts, **kw)
        self.lora_B = nn.Linear(r * self.experts, d_out, **kw)
        with torch.no_grad():
            if init is True:  # as the reference: Kaiming-uniform A over all experts' rows, B zero
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
                nn.init.zeros_(self.lora_B.weight)
            elif init == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1 / r)
                nn.init.zeros_(self.lora_B.weight)
            # init False: both random, so the adapter acts from the start (for tests)

    def delta(self) -> torch.Tensor:
        """``scaling * B_e @ A_e`` for every expert, in the parameter's own shape."""
        a = self.lora_A.weight.view(self.experts, self.r, -1)  # (experts, r, in)
        b = self.lora_B.weight.view(-1, self.r, self.experts).permute(2, 0, 1)  # (experts, out, r)
        delta = torch.bmm(b, a) * self.scaling  # (experts, out, in)
        if self.ndim == 2:
            return delta[0]
        return delta.transpose(1, 2) if self.transposed else delta


class LoraParameters(ParameterAdapter):
    """LoRA on the targeted parameters of one module, one :class:`LoraParameter` each."""

    def __init__(
        self,
        base_layer: nn.Module,
        parameters: dict[str, dict[str, Any]],
        dropout: float,
        use_rslora: bool,
        use_dora: bool,
        init: Any,
        init_options: dict[str, int] | None = None,  # LoftQ's; string inits are refused here
    ) -> None:
        names = ", ".join(parameters)
        if dropout:
            raise UnsupportedLayerError(
                f"LoRA on parameters ({names}) cannot use lora_dropout={dropout}: its delta is added to the "
                "weight, so there is no adapter input to drop out (the reference library refuses it too). Set "
                "lora_dropout=0, or leave these parameters out (exclude_modules for all-linear's experts)."
            )
        if use_dora:
            raise UnsupportedLayerError(
                f"DoRA is not available for LoRA on parameters ({names}): a stack of experts has no single "
                "weight norm (the reference library refuses it too). Set use_dora=False, or leave them out."
            )
        if isinstance(init, str) and init != "gaussian":
            raise UnsupportedLayerError(
                f"init_lora_weights={init!r} needs one weight matrix to decompose; LoRA on parameters ({names}) "
                "supports True/'default', 'gaussian' or False. Change the init, or leave them out."
            )
        super().__init__(list(parameters))
        self.targets = nn.ModuleDict(
            {
                name: LoraParameter(base_layer, name, use_rslora=use_rslora, init=init, **values)
                for name, values in parameters.items()
            }
        )

    def parameter_delta(self, name: str) -> torch.Tensor:
        return self.targets[name].delta()

    def parameter_sizes(self) -> dict[str, int]:
        return {n: sum(p.numel() for p in t.parameters()) for n, t in self.targets.items()}

    def describe(self, name: str) -> str:
        target = self.targets[name]
        return f"LoRA r={target.r}" + (f" x {target.experts} experts" if target.experts > 1 else "")

    def interchange_state(self, portable: bool = False) -> dict[str, torch.Tensor]:
        # The reference nests one wrapper per parameter, the last registered outermost; the targets are
        # kept in the module's registration order (targeting walks module._parameters).
        names = list(self.targets)
        state = {}
        for index, name in enumerate(names):
            nesting = "base_layer." * (len(names) - 1 - index)
            for suffix, tensor in self.targets[name].state_dict().items():
                state[nesting + suffix] = tensor
        return state

    def param_roles(self) -> dict[str, list[nn.Parameter]]:
        """Which parameters are the A and B sides (for LoRA+ learning rates)."""
        return {
            "A": [t.lora_A.weight for t in self.targets.values()],
            "B": [t.lora_B.weight for t in self.targets.values()],
        }


def check_parameter(module: nn.Module, name: str, param: nn.Parameter) -> str | None:
    """LoRA adapts 2-D weights and 3-D stacks of them, in floating point."""
    if param.dim() not in (2, 3):
        return f"a {param.dim()}-D parameter {tuple(param.shape)}: LoRA on parameters takes 2-D weights or 3-D expert stacks"
    if not param.is_floating_point():
        return f"stored as {param.dtype} (quantized?); LoRA on parameters needs a floating-point weight"
    return None


# -- what LoraConfig asks of this file ---------------------------------------------------------------


def config_problems(names: Any, lora_dropout: Any, use_dora: Any) -> list[str]:
    """The problems of a ``target_parameters`` value beside the rest of a LoRA config."""
    if names is None:
        return []
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        return [
            "target_parameters: expected a list of parameter names (the reference library takes no regex "
            f"here), got {names!r}"
        ]
    out = []
    if isinstance(lora_dropout, (int, float)) and lora_dropout:
        out.append(
            "lora_dropout: must be 0 with target_parameters: a parameter's delta is added to the weight, so "
            "there is no adapter input to drop out (the reference library refuses it too)"
        )
    if use_dora:
        out.append("use_dora: DoRA is not available with target_parameters (nor in the reference library)")
    return out


def layer_values(target: Any, r: int, alpha: float, common: dict[str, Any]) -> dict[str, Any]:
    """The builder's values for a parameter target: a rank and alpha per parameter. A fused gate-and-up
    expert weight chosen by all-linear (``maps=2``) gets twice both, as the reference library gives it
    (two rank-r LoRAs in the unfused layout are one rank-2r LoRA on the fused weight)."""
    per = {
        name: {"r": int(p.rank or r * p.maps), "alpha": float(p.alpha or alpha * p.maps)}
        for name, p in target.parameters.items()
    }
    return {"parameters": per, **common}


def record_all_linear(config: Any, plan: Any) -> Any:
    """``config`` as saved after all-linear also took stacked experts and routers, or whole
    ``nn.MultiheadAttention`` modules (``plan.all_linear``): explicit target lists and the fused weights' rank
    and alpha, which the reference library reads as the same adapter on any architecture. Refuses, before
    anything changes, options the parameters cannot take."""
    grown = plan.all_linear
    blocking = [
        name
        for name, on in (
            ("lora_dropout", config.lora_dropout),
            ("use_dora", config.use_dora),
            ("lora_bias", getattr(config, "lora_bias", False)),
        )
        if on
    ]
    if grown.target_parameters and blocking:
        owners = sorted({t.name.rpartition(".")[2] for t in plan.targets if t.parameters})
        raise UnsupportedLayerError(
            f"all-linear also chose weights held as parameters ({', '.join(grown.target_parameters)}: stacked "
            f"experts, routers), which LoRA cannot adapt with {blocking[0]}"
            " (the delta is added to the weight, as in the reference library). Set lora_dropout=0, "
            f"use_dora=False and lora_bias=False, or leave them out with exclude_modules={owners!r}."
        )
    return config.replace(
        target_modules=grown.target_modules,
        target_parameters=list(dict.fromkeys((config.target_parameters or []) + grown.target_parameters)),
        rank_pattern={**config.rank_pattern, **{k: config.r * m for k, m in grown.fused_rank.items()}},
        alpha_pattern={
            **config.alpha_pattern,
            **{k: config.lora_alpha * m for k, m in grown.fused_alpha.items()},
        },
    )


__all__ = ["LoraParameter", "LoraParameters", "check_parameter"]

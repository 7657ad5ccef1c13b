"""LayerNorm tuning: train only the normalisation layers' scale and shift (Zhao et al. 2023,
arXiv:2312.11420, "Tuning LayerNorm in Attention"), the reference library's ``LN_TUNING``.

The paper finds that tuning just the LayerNorm (or RMSNorm) weights in each attention block is a strong,
tiny-budget baseline for adapting a language model to new tasks and modalities. As in the reference
library, each targeted norm layer gets a trainable copy (``ln_tuning_layers``); its weight (and bias,
if the layer has one) are the adapter's tensors, saved under the reference key names
``base_model.model.<module>.ln_tuning_layers.weight`` / ``.bias`` (full tensors, not deltas).

Normalisation layers compute ``g(x) * w + b`` (or ``g(x) * (1 + w)``, Gemma), affine in their parameters.
So the adapter can be written as a parameter delta ``w_copy - w_original`` applied to whatever the base
layer currently holds: the output changes by ``norm(x; w_base + delta) - norm(x; w_base)``, several adapters on
one layer add up, merging writes ``w + delta`` (and ``b + delta_b``) into the base layer, and ``disable()``
gives the base exactly. With one adapter this is what the reference's forward (run the copy) and merge
(swap in the copy) compute, up to float rounding.

The reference copies whatever module it is pointed at, and its custom-model tests tune a ``Linear`` this
way. peftkit takes the other layer kinds whose output is affine in their own weight and bias, where the
same delta form holds: linear layers (and GPT-2's ``Conv1D``), convolutions (grouped ones included) and
embeddings, each trained in full as a copy.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.config import ALL_LINEAR, AdapterConfig
from ..core.layer import AdapterModule
from ..core.registry import register_layer, register_method
from ..core.targeting import HFConv1D, Plan, Target

PEFT_TYPE = "LN_TUNING"

# Base-config fields the reference LNTuningConfig does not have: written, they would make it warn.
_NOT_IN_REFERENCE = ("layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern")


@register_method(PEFT_TYPE)
@dataclass
class LNTuningConfig(AdapterConfig):
    """LayerNorm tuning. Only the shared fields: which norm layers to tune (``target_modules``,
    ``exclude_modules``) and which modules to train in full (``modules_to_save``).

    ``target_modules=None`` picks the reference library's norm layers for the architecture (e.g. Llama:
    ``input_layernorm``, ``post_attention_layernorm``, ``norm``); peftkit adds BERT-family encoders
    (``LayerNorm``), which the reference lacks. Any other architecture gets its norm layers as wide as
    its hidden states, found by structure (docs/targets.md): those of every block and the final and
    embedding norms, not per-head query/key norms. Once injected the config lists the modules
    explicitly, as the reference's saved configs do, so either library reads a saved adapter the same way.
    """

    pick_when = "you want a near-free baseline, or a domain shift where the normalisation layers matter; combines with other methods"

    lr_candidates: ClassVar[tuple[float, ...]] = (
        1e-3,
        3e-3,
        1e-2,
    )  # norm weights and biases: a few thousand parameters at BitFit-like rates

    fields_not_in_format: ClassVar[tuple[str, ...]] = _NOT_IN_REFERENCE
    quantizable: ClassVar[bool] = True  # norms stay unquantized (backends/)

    # The reference 0.21.2 defaults (its LN-tuning target mapping), except "llava", whose default also
    # names non-norm modules (projector, embeddings, head) that this norm-only method cannot adapt.
    default_targets: ClassVar[dict[str, list[str]]] = {
        "llama": ["input_layernorm", "post_attention_layernorm", "norm"],
        "bloom": ["input_layernorm", "post_attention_layernorm", "ln_f"],
        "t5": ["layer_norm", "final_layer_norm"],
        "mt5": ["layer_norm", "final_layer_norm"],
        "bart": ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"],
        "gpt2": ["ln_1", "ln_2", "ln_f"],
        "blip-2": ["layernorm", "LayerNorm", "final_layer_norm", "self_attn_layer_norm"],
        "gptj": ["ln_1", "ln_f"],
        "falcon": ["input_layernorm", "post_attention_layernorm", "ln_f"],
        "mistral": ["input_layernorm", "post_attention_layernorm", "norm"],
        "phi": ["input_layernorm", "final_layernorm"],
        "gemma": ["input_layernorm", "post_attention_layernorm", "norm"],
        "gemma2": [
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
            "norm",
        ],
        "gemma3_text": [
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
            "norm",
        ],
        "qwen2": ["post_attention_layernorm"],
        "qwen3": ["post_attention_layernorm"],
        # peftkit's own: every norm of a BERT-family encoder is called LayerNorm
        "bert": ["LayerNorm"],
        "roberta": ["LayerNorm"],
        "xlm-roberta": ["LayerNorm"],
    }
    target_roles: ClassVar[tuple[str, ...]] = ("norm",)
    own_default_types: ClassVar[tuple[str, ...]] = ("bert", "roberta", "xlm-roberta")

    def problems(self) -> list[str]:
        out = super().problems()
        if self.target_modules == ALL_LINEAR:
            out.append(
                "target_modules: 'all-linear' would train a full copy of every linear layer (full fine-tuning at "
                "twice the memory); name the layers to tune (e.g. ['input_layernorm', 'post_attention_layernorm']) "
                "or leave None for the norm layers"
            )
        for name in _NOT_IN_REFERENCE:
            if getattr(self, name) not in (None, [], {}, ""):
                hint = (
                    "put the layer numbers into a regex target_modules, e.g. r'.*\\.layers\\.(0|1)\\.input_layernorm'"
                    if name.startswith("layers")
                    else "LN tuning has no rank or alpha; leave it empty"
                )
                out.append(
                    f"{name}: not part of the LN_TUNING format (the reference library has no such field); {hint}"
                )
        return out

    def layer_values(self, target: Target) -> dict[str, Any]:
        return {}

    def after_resolve(self, plan: Plan) -> LNTuningConfig:
        # Record the default, as the reference library writes it into adapter_config.json.
        if self.target_modules is None and plan.default is not None:
            return self.replace(target_modules=plan.default.spec)
        return self


class LNTuningNorm(AdapterModule):
    """A trainable copy of one normalisation layer (or linear, conv or embedding layer), applied as a
    delta on its parameters.

    ``ln_tuning_layers`` is the copy (the reference's name, hence the saved keys); the original
    parameters are kept as non-persistent buffers to express the copy as a delta on the base layer.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.ln_tuning_layers = copy.deepcopy(base_layer)
        self.ln_tuning_layers.requires_grad_(True)
        self.tuned = tuple(
            n for n in ("weight", "bias") if isinstance(base_layer._parameters.get(n), nn.Parameter)
        )
        self.merge_into = self.tuned
        for name in self.tuned:
            self.register_buffer(
                f"original_{name}", getattr(base_layer, name).detach().clone(), persistent=False
            )

    def _delta(self, name: str) -> torch.Tensor:
        return getattr(self.ln_tuning_layers, name) - getattr(self, f"original_{name}")

    def delta_output(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        # The copy's forward with the base layer's current parameters plus this adapter's delta: when
        # nothing is merged that is the copy's own parameters; when another adapter is merged, its
        # change is kept. Any norm class works this way, whatever its formula.
        params = {name: getattr(base_layer, name) + self._delta(name) for name in self.tuned}
        return torch.func.functional_call(self.ln_tuning_layers, params, (x,)) - base_out

    def merged_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: tensors[name] + self._delta(name).to(tensors[name].dtype) for name in self.tuned}

    def unmerged_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: tensors[name] - self._delta(name).to(tensors[name].dtype) for name in self.tuned}


def _is_named_norm(module: nn.Module) -> bool:
    return any(c.__name__.endswith(("RMSNorm", "LayerNorm")) for c in type(module).__mro__)


class _NamedNormMeta(type):
    def __instancecheck__(cls, module: object) -> bool:
        return isinstance(module, nn.Module) and _is_named_norm(module)


class NamedNorm(metaclass=_NamedNormMeta):
    """Matches, via ``isinstance``, any module whose class is named ``...RMSNorm`` or ``...LayerNorm``:
    the RMSNorm each transformers model family defines for itself (LlamaRMSNorm, Qwen2RMSNorm,
    GemmaRMSNorm, T5LayerNorm ...), found without importing every model family."""


# What summaries and "supported layer types" messages print for this row.
NamedNorm.__module__, NamedNorm.__qualname__ = "", "*RMSNorm/*LayerNorm classes"


def _affine_check(module: nn.Module) -> str | None:
    if not isinstance(module._parameters.get("weight"), nn.Parameter):
        return f"{type(module).__name__} has no weight (elementwise_affine=False): nothing to tune"
    return None


def _named_norm_check(module: nn.Module) -> str | None:
    problem = _affine_check(module)
    if problem is None and (
        set(module._parameters) - {"weight", "bias"} or any(True for _ in module.children())
    ):
        problem = f"{type(module).__name__} holds more than a weight and a bias; LN tuning supports plain norm layers"
    return problem


def _dense_check(module: nn.Module) -> str | None:
    weight = module._parameters.get("weight")
    if not isinstance(weight, nn.Parameter):
        return f"{type(module).__name__} holds no weight parameter"
    if not weight.is_floating_point():
        return f"its weight is stored as {weight.dtype} (quantized?); LN tuning trains a floating-point copy"
    return None


register_layer(PEFT_TYPE, "LayerNorm", (nn.LayerNorm,), LNTuningNorm, check=_affine_check)
register_layer(PEFT_TYPE, "RMSNorm", (nn.RMSNorm,), LNTuningNorm, check=_affine_check)
register_layer(PEFT_TYPE, "RMSNorm (model's own)", (NamedNorm,), LNTuningNorm, check=_named_norm_check)
# layers whose output is affine in their weight and bias too: the same delta form (module docstring)
register_layer(PEFT_TYPE, "Linear", (nn.Linear,), LNTuningNorm, check=_dense_check)
if HFConv1D:
    register_layer(PEFT_TYPE, "Conv1D (GPT-2)", (HFConv1D,), LNTuningNorm, check=_dense_check)
register_layer(PEFT_TYPE, "Conv", (nn.Conv1d, nn.Conv2d, nn.Conv3d), LNTuningNorm, check=_dense_check)
register_layer(PEFT_TYPE, "Embedding", (nn.Embedding,), LNTuningNorm, check=_dense_check)


__all__ = ["LNTuningConfig", "LNTuningNorm", "NamedNorm"]

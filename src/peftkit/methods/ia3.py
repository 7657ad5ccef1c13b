"""(IA)³ (Liu et al. 2022, arXiv:2205.05638, section 3.3): learned vectors that rescale activations.

Each adapted layer gets one trainable vector ``l``, initialised to ones:

- on an attention-style layer the *output* is rescaled per output feature: ``h = l ⊙ (W x + b)``;
- on a "feedforward" layer (the second linear layer of an MLP in the paper) the *input* is rescaled
  per input feature: ``h = W (l ⊙ x) + b``.

Both are diagonal matrices folded into the weight on merge (``diag(l) W`` resp. ``W diag(l)``, and
the bias ``l ⊙ b`` for the output form), so a merged (IA)³ model costs nothing extra.

An (IA)³ adapter rescales its layer's input or output around the one base call (the core's
``transforms`` hook), so several active (IA)³ adapters on one layer multiply their vectors, as in
the reference library. Because the scaling applies to whatever the weight holds, the adapter is
marked non-additive: the core refuses to merge it beside any other active or merged adapter on the
same layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..core.layer import AdapterModule, adapter_dtype
from ..core.registry import register_layer, register_method
from ..core.targeting import HFConv1D, Plan, Target
from ..errors import ConfigError

PEFT_TYPE = "IA3"

# Base-config fields the reference library's IA3 config does not have: they are never written to
# adapter_config.json (an unknown key makes the reference library warn) and so must stay unset.
_NOT_IN_FORMAT = ("layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern")


def is_feedforward(spec: list[str] | str | None, name: str) -> bool:
    """Whether module ``name`` is a feedforward module under ``spec`` (the reference library's rule:
    a string is a full-match regex; a list entry matches as a plain suffix of the name, so
    ``"output.dense"`` also matches ``attention.output.dense``)."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name.endswith(entry) for entry in spec)


@register_method(PEFT_TYPE)
@dataclass
class IA3Config(AdapterConfig):
    """(IA)³: one learned scaling vector per adapted layer.

    Attributes:
        feedforward_modules: Which targets scale their *input* instead of their output (list entries
            match as a name suffix, a string is a full-match regex). Every entry must also be in
            ``target_modules``. ``None`` with ``target_modules`` unset takes the reference library's
            default for the architecture (e.g. BERT ``["output.dense"]``, Llama ``["down_proj"]``), else
            the MLP down projection found by structure (docs/targets.md); with ``target_modules`` set
            on an architecture without a table entry it means "none".
        fan_in_fan_out: Recorded for the interchange format; peftkit reads the layout from the layer
            type (GPT-2's ``Conv1D`` stores its weight as in x out) and records True for it.
        init_ia3_weights: ``True`` starts every vector at ones (the adapted model equals the base);
            ``False`` draws them from N(0, 1), for tests.
    """

    pick_when = "you want the fewest parameters that still merge: one scaling vector per key, value and feed-forward input; strong in few-shot settings"

    lr_candidates: ClassVar[tuple[float, ...]] = (
        3e-3,
        1e-2,
        3e-2,
    )  # IA3 scales vectors around 1: the (IA)3 paper trains at 3e-3, later work up to 3e-2

    fields_not_in_format: ClassVar[tuple[str, ...]] = _NOT_IN_FORMAT
    quantizable: ClassVar[bool] = True  # IA3QuantLinear scales around the quantized matmul (backends/)

    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    # The reference library's defaults per architecture: two attention projections plus the MLP's
    # output layer, which is the feedforward module. Other architectures (and entries naming modules
    # the model lacks, e.g. Mixtral's "w2", whose experts transformers 5 stacks into one tensor): the
    # attention key and value and the MLP down projection found by structure, the MLP down being the
    # feedforward module (a mixture of experts without expert layers has none).
    default_targets: ClassVar[dict[str, list[str]]] = {
        "bert": ["key", "value", "output.dense"],
        "roberta": ["key", "value", "output.dense"],
        "deberta-v2": ["key_proj", "value_proj", "output.dense"],
        "deberta": ["in_proj", "output.dense"],
        "gpt2": ["c_attn", "mlp.c_proj"],
        "gpt_bigcode": ["c_attn", "mlp.c_proj"],
        "llama": ["k_proj", "v_proj", "down_proj"],
        "llama4": ["q_proj", "v_proj", "down_proj"],
        "mistral": ["k_proj", "v_proj", "down_proj"],
        "mixtral": ["k_proj", "v_proj", "w2"],
        "qwen2": ["q_proj", "v_proj", "down_proj"],
        "qwen3": ["q_proj", "v_proj", "down_proj"],
        "gemma": ["q_proj", "v_proj", "down_proj"],
        "gemma2": ["q_proj", "v_proj", "down_proj"],
        "gemma3_text": ["q_proj", "v_proj", "down_proj"],
        "phi": ["q_proj", "v_proj", "fc2"],
        "t5": ["k", "v", "wo"],
        "mt5": ["k", "v", "wi_1"],
        "bart": ["q_proj", "v_proj", "fc2"],
        "opt": ["q_proj", "k_proj", "fc2"],
        "gptj": ["q_proj", "v_proj", "fc_out"],
        "gpt_neo": ["q_proj", "v_proj", "c_proj"],
        "gpt_neox": ["query_key_value", "dense_4h_to_h"],
        "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
        "falcon": ["query_key_value", "dense_4h_to_h"],
    }
    default_feedforward: ClassVar[dict[str, list[str]]] = {
        "bert": ["output.dense"],
        "roberta": ["output.dense"],
        "deberta-v2": ["output.dense"],
        "deberta": ["output.dense"],
        "gpt2": ["mlp.c_proj"],
        "gpt_bigcode": ["mlp.c_proj"],
        "llama": ["down_proj"],
        "llama4": ["down_proj"],
        "mistral": ["down_proj"],
        "mixtral": ["w2"],
        "qwen2": ["down_proj"],
        "qwen3": ["down_proj"],
        "gemma": ["down_proj"],
        "gemma2": ["down_proj"],
        "gemma3_text": ["down_proj"],
        "phi": ["fc2"],
        "t5": ["wo"],
        "mt5": [],
        "bart": ["fc2"],
        "opt": ["fc2"],
        "gptj": ["fc_out"],
        "gpt_neo": ["c_proj"],
        "gpt_neox": ["dense_4h_to_h"],
        "bloom": ["mlp.dense_4h_to_h"],
        "falcon": ["dense_4h_to_h"],
    }
    target_roles: ClassVar[tuple[str, ...]] = ("key", "value", "mlp_down")
    optional_roles: ClassVar[tuple[str, ...]] = ("mlp_down",)

    def __post_init__(self) -> None:
        if isinstance(self.feedforward_modules, (set, tuple)):
            ff = self.feedforward_modules
            self.feedforward_modules = sorted(ff) if isinstance(ff, set) else list(ff)
        super().__post_init__()

    def problems(self) -> list[str]:
        out = super().problems()
        ff = self.feedforward_modules
        if isinstance(ff, str):
            try:
                re.compile(ff)
            except re.error as exc:
                out.append(f"feedforward_modules: {ff!r} is not a valid regular expression ({exc})")
        elif isinstance(ff, list):
            if not all(isinstance(v, str) and v for v in ff):
                out.append(f"feedforward_modules: every entry must be a non-empty string, got {ff!r}")
            elif isinstance(self.target_modules, list):
                missing = sorted(set(ff) - set(self.target_modules))
                if missing:
                    out.append(
                        f"feedforward_modules: {missing} not in target_modules {self.target_modules}; every "
                        "feedforward module must also be a target (the reference library's rule): add them to "
                        "target_modules or remove them from feedforward_modules"
                    )
        elif ff is not None:
            out.append(
                f"feedforward_modules: expected a list of names, a regex string or None, got {type(ff).__name__}"
            )
        for name in ("fan_in_fan_out", "init_ia3_weights"):
            if not isinstance(getattr(self, name), bool):
                out.append(f"{name}: must be True or False, got {getattr(self, name)!r}")
        for name in _NOT_IN_FORMAT:
            if getattr(self, name) not in (None, {}, []):
                out.append(
                    f"{name}: IA3 has no such option in the interchange format (it would be lost on save); "
                    + (
                        "select layers with a regex in target_modules instead"
                        if name.startswith("layers")
                        else "IA3 has no rank or alpha"
                    )
                )
        return out

    def layer_values(self, target: Target) -> dict[str, Any]:
        return {
            "feedforward": is_feedforward(self.feedforward_modules, target.name),
            "init": self.init_ia3_weights,
        }

    def after_resolve(self, plan: Plan) -> IA3Config:
        """Record concrete target and feedforward modules (the reference library saves them resolved
        too), and ``fan_in_fan_out`` when GPT-2 ``Conv1D`` layers were found."""
        targets = self.target_modules
        if targets is None and plan.default is not None:  # resolve() chose the defaults
            targets = plan.default.spec
            ff = self.feedforward_modules
            if isinstance(ff, list) and isinstance(targets, list) and not set(ff) <= set(targets):
                raise ConfigError(
                    [
                        f"feedforward_modules {ff} are not among the default target_modules {targets} for "
                        f"model_type {plan.model_type!r} ({plan.default.source}); every feedforward module must "
                        "also be a target: set target_modules explicitly"
                    ],
                    what=type(self).__name__,
                )
        ff = self.feedforward_modules
        if ff is None:
            ff = self._default_feedforward(plan, targets)
        fan_in_fan_out = bool(HFConv1D) and any(isinstance(t.module, HFConv1D) for t in plan.targets)
        return self.replace(target_modules=targets, feedforward_modules=ff, fan_in_fan_out=fan_in_fan_out)

    def _default_feedforward(self, plan: Plan, targets: list[str] | str) -> list[str] | str:
        if plan.default is not None and plan.default.by_structure:
            return _structural_feedforward(plan)
        defaults = self.default_feedforward.get(plan.model_type)
        if not defaults:  # an architecture without defaults: no layer scales its input unless named
            return []
        used = [e for e in defaults if any(is_feedforward([e], t.name) for t in plan.targets)]
        if isinstance(targets, str) or set(used) <= set(targets):
            return used
        # e.g. target_modules=["dense"] on BERT: the default "output.dense" is not a target entry, which
        # the reference library refuses on load; name the feedforward targets exactly instead.
        names = [t.name for t in plan.targets if is_feedforward(used, t.name)]
        return "|".join(re.escape(n) for n in names)


def _structural_feedforward(plan: Plan) -> list[str] | str:
    """The part of a structural default selecting the MLP down projections, as feedforward modules.

    It is kept as the target entries themselves (the reference library's subset rule) unless the
    reference's plain-suffix reading of feedforward entries would also take another target; then it
    names the modules exactly."""
    part = plan.default.parts.get("mlp_down", []) if plan.default is not None else []
    if not part:
        return []
    by_target = [t.name for t in plan.targets if is_feedforward(part, t.name)]
    meant = [
        t.name
        for t in plan.targets
        if (
            re.fullmatch(part, t.name)
            if isinstance(part, str)
            else any(t.name == e or t.name.endswith("." + e) for e in part)
        )
    ]
    if by_target == meant:
        return part
    return "|".join(re.escape(n) for n in meant)


# -- the adapter ------------------------------------------------------------------------------------


class IA3Adapter(AdapterModule):
    """One (IA)³ vector ``ia3_l`` on one layer; subclasses say how it lines up with the layer's tensors.

    The vector keeps the reference library's shape per kind, so saved files interchange unchanged.
    """

    # The delta scales whatever weight it is merged into: merged beside another adapter it would
    # scale that one too, so the core merges it only when alone on its layer.
    additive = False

    def __init__(self, base_layer: nn.Module, shape: tuple[int, ...], feedforward: bool, init: bool) -> None:
        super().__init__()
        weight = base_layer.weight
        # Half-precision bases get a float32 vector: updates of ~1e-3 vanish in bf16 around 1.0.
        dtype = adapter_dtype(weight)
        values = (
            torch.ones(shape, dtype=dtype, device=weight.device)
            if init
            else torch.randn(shape, dtype=dtype).to(weight.device)
        )
        self.ia3_l = nn.Parameter(values)
        self.feedforward = feedforward
        # Scale the base layer's input (l ⊙ x) or its output (l ⊙ h); either way the base runs once and
        # several active vectors multiply, as in the reference library.
        self.transforms = "input" if feedforward else "output"
        # The input form leaves the bias alone: W (l ⊙ x) + b.
        self.merge_into = (
            ("weight",) if feedforward or getattr(base_layer, "bias", None) is None else ("weight", "bias")
        )
        self.groups = getattr(base_layer, "groups", 1)
        self._merged_l: torch.Tensor | None = None  # the vector a merge used, for its exact inverse
        self._kept: dict[str, torch.Tensor] = {}  # base values a zero scale erased, restored by unmerge

    # kind-specific: the vector shaped to broadcast against the layer's input/output and its weight
    def activation_scale(self, vec: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weight_scale(self, vec: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def transform(self, tensor: torch.Tensor) -> torch.Tensor:
        scale = self.activation_scale(self.ia3_l)
        return (tensor.to(scale.dtype) * scale).to(tensor.dtype)

    def _scale_for(self, name: str, tensor: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        if name == "bias":
            return vec.reshape(-1).to(tensor.dtype)
        return self.weight_scale(vec, tensor).to(tensor.dtype)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * (self._scale_for("weight", weight, self.ia3_l.detach()) - 1)

    def merged_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        vec = self.ia3_l.detach().clone()
        out, kept = {}, {}
        for name, tensor in tensors.items():
            scale = self._scale_for(name, tensor, vec)
            zero = (scale == 0).expand_as(tensor)
            if zero.any():  # l_i = 0 erases those weights: keep them so unmerge can give them back
                kept[name] = tensor[zero].clone()
            out[name] = tensor * scale
        self._merged_l, self._kept = vec, kept
        return out

    def unmerged_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        assert self._merged_l is not None, "unmerge of an adapter that was never merged"
        out = {}
        for name, tensor in tensors.items():
            scale = self._scale_for(name, tensor, self._merged_l.to(tensor.device))
            zero = scale == 0
            restored = tensor / torch.where(zero, torch.ones_like(scale), scale)
            if name in self._kept:
                restored[zero.expand_as(tensor)] = self._kept[name].to(restored.device, restored.dtype)
            out[name] = restored
        self._merged_l, self._kept = None, {}
        return out


class IA3Linear(IA3Adapter):
    """(IA)³ on ``nn.Linear`` and GPT-2 ``Conv1D``: ``ia3_l`` is (out, 1), or (1, in) on a feedforward layer."""

    def __init__(self, base_layer: nn.Module, feedforward: bool, init: bool) -> None:
        transposed = not isinstance(base_layer, nn.Linear)  # Conv1D stores its weight as in x out
        in_f, out_f = base_layer.weight.shape if transposed else base_layer.weight.shape[::-1]
        super().__init__(base_layer, (1, in_f) if feedforward else (out_f, 1), feedforward, init)
        self.transposed = transposed

    def activation_scale(self, vec):
        return vec.reshape(-1)  # features are the last dimension of input and output

    def weight_scale(self, vec, weight):
        # (out, 1) scales rows and (1, in) columns of an out x in weight; Conv1D's is in x out
        return vec.T if self.transposed else vec


class IA3Conv(IA3Adapter):
    """(IA)³ on ``nn.Conv1d/2d/3d``: ``ia3_l`` is (1, channels, 1, ...), channels being the output
    channels, or the input channels on a feedforward layer (the reference library's layout)."""

    def __init__(self, base_layer: nn.modules.conv._ConvNd, feedforward: bool, init: bool) -> None:
        channels = base_layer.in_channels if feedforward else base_layer.out_channels
        ones = (1,) * (base_layer.weight.dim() - 2)
        super().__init__(base_layer, (1, channels, *ones), feedforward, init)

    def activation_scale(self, vec):
        return vec  # (1, C, 1, ...) broadcasts over batch and spatial dimensions

    def weight_scale(self, vec, weight):
        if not self.feedforward:
            return vec.transpose(0, 1)  # (out, 1, 1, ...) scales whole output filters
        if self.groups == 1:
            return vec  # (1, in, 1, ...) scales input channels
        # Grouped: weight is (out, in/groups, k...); output channel o of group g reads input channels
        # g*in_per_group ... (g+1)*in_per_group - 1.
        out_channels, in_per_group = weight.shape[:2]
        kernel = vec.shape[2:]
        per_group = vec.reshape(self.groups, 1, in_per_group, *kernel)
        per_group = per_group.expand(self.groups, out_channels // self.groups, in_per_group, *kernel)
        return per_group.reshape(out_channels, in_per_group, *kernel)


register_layer(PEFT_TYPE, "Linear", (nn.Linear,), IA3Linear)
if HFConv1D:
    register_layer(PEFT_TYPE, "Conv1D (GPT-2)", (HFConv1D,), IA3Linear)
register_layer(PEFT_TYPE, "Conv", (nn.Conv1d, nn.Conv2d, nn.Conv3d), IA3Conv)


__all__ = ["IA3Config", "IA3Adapter", "IA3Linear", "IA3Conv", "is_feedforward"]

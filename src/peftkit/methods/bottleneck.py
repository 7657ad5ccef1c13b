"""Bottleneck adapters: Houlsby (sequential, two per layer), Pfeiffer (sequential, one) and parallel.

A bottleneck adapter is a small two-layer network ``f(h) = s * up(act(down(h)))`` with ``down``:
d -> d/reduction_factor and ``up`` back to d. ``up`` starts at zero, so a fresh adapter leaves the
model exactly as it was (He et al.'s init; Houlsby et al. drew both near zero instead).

- **houlsby** (Houlsby et al. 2019, arXiv:1902.00751, section 2.1): sequential adapters after the
  attention block's output projection and after the feed-forward block's output projection, before
  the residual connection and layer norm: ``h <- h + f(h)``.
- **pfeiffer** (Pfeiffer et al. 2020, arXiv:2005.00247, AdapterFusion section 3.1 / figure 3): only the
  adapter after the feed-forward block, which their search found as good at half the cost.
- **parallel** (He et al. 2022, arXiv:2110.04366, section 3, "parallel adapter" at the FFN, their best
  placement): the adapter reads the *input* x of the feed-forward block and runs beside it:
  ``block(x) + s * up(act(down(x)))``.

Every placement point is an :class:`~peftkit.core.layer.AdapterLayer` around one module; a sequential
adapter computes its delta from the module's output, a parallel one from its input. BERT-like encoders
split the feed-forward block over ``intermediate`` (dense + activation) and ``output`` (dense, dropout,
then ``LayerNorm(h + residual)``), so no single module there has the block's input and output: the
parallel adapter wraps ``output``, reads its second argument (the residual, which *is* the block's
input) and adds its result before that LayerNorm, where He et al. put it (see
:class:`ResidualOutputAdapter`). The adapter is non-linear, so it cannot be merged into a weight.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.anatomy import is_norm
from ..core.config import AdapterConfig
from ..core.layer import AdapterLayer, AdapterModule, ModulesToSave
from ..core.layer import adapter_dtype as _adapter_dtype
from ..core.registry import register_layer, register_method
from ..core.targeting import LINEAR_TYPES, HFConv1D, Target
from ..errors import UnsupportedLayerError

PEFT_TYPE = "BOTTLENECK"
PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
# The scaling each placement's paper used when `scaling` is None (He et al. table 3: s = 4).
DEFAULT_SCALING = {"houlsby": 1.0, "pfeiffer": 1.0, "parallel": 4.0}

ACTIVATIONS: dict[str, type[nn.Module] | Any] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
    # No activation: on a linear layer the adapter is then a fixed change of its weight and bias, so it
    # merges and converts exactly to LoRA (a parallel linear adapter *is* a LoRA, He et al. section 3).
    "identity": nn.Identity,
}

# Where each placement puts adapters, per model_type. A string is a regular expression over the full
# module name: BERT-like encoders name both output projections "...output.dense" (the attention one
# is "attention.output.dense"), which no list of name suffixes can tell apart. Other architectures:
# the same places found by structure (PLACEMENT_ROLES, core/anatomy.py).
_BERT_LIKE = ("bert", "roberta", "xlm-roberta", "electra")
_LLAMA_LIKE = ("llama", "mistral", "qwen2")
DEFAULT_TARGETS: dict[str, dict[str, list[str] | str]] = {
    "houlsby": {
        **dict.fromkeys(_BERT_LIKE, r".*\.layer\.\d+\.(attention\.)?output\.dense"),
        **dict.fromkeys(_LLAMA_LIKE, ["self_attn.o_proj", "mlp.down_proj"]),
        "distilbert": ["attention.out_lin", "ffn.lin2"],
        "gpt2": ["attn.c_proj", "mlp.c_proj"],
        "t5": ["SelfAttention.o", "DenseReluDense.wo"],
        "mt5": ["SelfAttention.o", "DenseReluDense.wo"],
    },
    "pfeiffer": {
        **dict.fromkeys(_BERT_LIKE, r".*\.layer\.\d+\.output\.dense"),
        **dict.fromkeys(_LLAMA_LIKE, ["mlp.down_proj"]),
        "distilbert": ["ffn.lin2"],
        "gpt2": ["mlp.c_proj"],
        "t5": ["DenseReluDense.wo"],
        "mt5": ["DenseReluDense.wo"],
    },
    "parallel": {  # the feed-forward block whose input feeds the adapter
        **dict.fromkeys(_BERT_LIKE, r".*\.layer\.\d+\.output"),
        **dict.fromkeys(_LLAMA_LIKE, ["mlp"]),
        "distilbert": ["ffn"],
        "gpt2": ["mlp"],
        "t5": ["DenseReluDense"],
        "mt5": ["DenseReluDense"],
    },
}


# The same places as roles of core/anatomy.py: after the self-attention's output projection and after
# the feed-forward (its down projection, or a mixture-of-experts block that has no expert layers), or
# around the module holding the whole feed-forward computation.
PLACEMENT_ROLES = {
    "houlsby": ("self_attention_output", "mlp_output"),
    "pfeiffer": ("mlp_output",),
    "parallel": ("mlp",),
}


@register_method(PEFT_TYPE)
@dataclass
class BottleneckConfig(AdapterConfig):
    """Bottleneck adapters (no reference-library format exists; ``peft_type`` is ``"BOTTLENECK"``).

    Attributes:
        placement: ``"houlsby"`` (after the attention and the feed-forward output projections),
            ``"pfeiffer"`` (after the feed-forward output projection only) or ``"parallel"`` (beside the
            feed-forward block, reading its input). Chooses the default ``target_modules`` (a table for
            BERT-like, Llama-like, GPT-2, DistilBERT and T5 models, the same places found by structure
            for others; docs/targets.md) and whether an adapter reads a module's output (sequential) or
            its input (parallel).
        reduction_factor: Bottleneck width is ``d // reduction_factor``, with ``d`` the hidden width
            (the adapted module's output width; for parallel adapters its input width).
        bottleneck_size: A fixed bottleneck width instead; overrides ``reduction_factor``.
            ``rank_pattern`` gives per-module widths (regex on the end of the module name -> width).
        non_linearity: Activation between down and up projections: relu, gelu, gelu_tanh, silu (or
            swish), tanh, sigmoid, leaky_relu, or identity (none: on a linear layer the adapter can then
            be merged, and written as a LoRA with ``peftkit.convert_to_lora``).
        scaling: Factor on the adapter's output; None means 1.0 for sequential placements and 4.0 for
            parallel (He et al.). ``alpha_pattern`` gives per-module factors.
        dropout: Dropout on the adapter's input while training.
    """

    pick_when = "you want the classic adapters (Houlsby, Pfeiffer, parallel) or a nonlinear adapter, and accept a small inference cost: they never merge"

    lr_candidates: ClassVar[tuple[float, ...]] = (
        5e-4,
        2e-3,
        5e-3,
    )  # Houlsby and Pfeiffer adapters: 1e-4 to 1e-3 over long runs, higher for short budgets

    placement: str = "houlsby"
    reduction_factor: float = 16
    bottleneck_size: int | None = None
    non_linearity: str = "relu"
    scaling: float | None = None
    dropout: float = 0.0

    @property
    def default_targets(self) -> dict[str, list[str] | str]:
        """Default ``target_modules`` per model_type for this config's placement."""
        return DEFAULT_TARGETS.get(self.placement, {})

    def default_roles(self) -> tuple[str, ...]:
        return PLACEMENT_ROLES.get(self.placement, ())

    def table_source(self, model_type: str) -> str:
        return f"peftkit default for {model_type} ({self.placement})"  # no reference library has bottlenecks

    def problems(self) -> list[str]:
        out = super().problems()
        if self.placement not in PLACEMENTS:
            out.append(f"placement: must be one of {', '.join(PLACEMENTS)}; got {self.placement!r}")
        rf = self.reduction_factor
        if isinstance(rf, bool) or not isinstance(rf, (int, float)) or not rf > 0:
            out.append(f"reduction_factor: must be a positive number, got {rf!r}")
        size = self.bottleneck_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
            out.append(f"bottleneck_size: must be a positive integer or None, got {size!r}")
        if self.non_linearity not in ACTIVATIONS:
            out.append(f"non_linearity: must be one of {', '.join(ACTIVATIONS)}; got {self.non_linearity!r}")
        s = self.scaling
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0):
            out.append(f"scaling: must be a positive number or None (the placement's default), got {s!r}")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            out.append(f"dropout: must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.rank_pattern, dict) and any(
            isinstance(v, float) and not float(v).is_integer() for v in self.rank_pattern.values()
        ):
            out.append(f"rank_pattern: bottleneck widths must be whole numbers, got {self.rank_pattern!r}")
        return out

    def layer_values(self, target: Target) -> dict[str, Any]:
        size = target.rank or self.bottleneck_size
        scaling = target.alpha or self.scaling or DEFAULT_SCALING[self.placement]
        return {
            "parallel": self.placement == "parallel",
            "bottleneck_size": None if size is None else int(size),
            "reduction_factor": float(self.reduction_factor),
            "non_linearity": self.non_linearity,
            "scaling": float(scaling),
            "dropout": float(self.dropout),
        }


# -- the adapters -----------------------------------------------------------------------------------


def _widths(linear: nn.Module) -> tuple[int, int]:
    """(input width, output width) of an ``nn.Linear`` or GPT-2 ``Conv1D`` (weight stored in x out)."""
    if isinstance(linear, nn.Linear):
        return linear.in_features, linear.out_features
    return linear.weight.shape[0], linear.weight.shape[1]


class BottleneckAdapter(AdapterModule):
    """``s * up(act(down(dropout(h))))`` with ``h`` the module's output (sequential) or input (parallel).

    Tensors (interchange suffixes): ``adapter_down.weight`` (b x d_h), ``adapter_down.bias`` (b),
    ``adapter_up.weight`` (d_out x b), ``adapter_up.bias`` (d_out), where b is the bottleneck width and
    d_h the width the adapter reads.
    """

    mergeable = False  # the activation makes it non-linear: no weight reproduces it

    def __init__(
        self,
        d_in: int,
        d_out: int,
        like: torch.Tensor,
        *,
        parallel: bool,
        bottleneck_size: int | None,
        reduction_factor: float,
        non_linearity: str,
        scaling: float,
        dropout: float,
    ) -> None:
        super().__init__()
        self.parallel = parallel
        d_read = d_in if parallel else d_out
        size = bottleneck_size or int(d_read // reduction_factor)
        if size < 1:
            raise UnsupportedLayerError(
                f"reduction_factor={reduction_factor:g} on a layer {d_read} wide gives a bottleneck of 0 units; "
                "set bottleneck_size, or a smaller reduction_factor"
            )
        kw = {"device": like.device, "dtype": _adapter_dtype(like)}
        # down keeps nn.Linear's Kaiming-uniform init; up starts at zero so the adapted model starts at
        # the base model (He et al. 2022's init; gradients reach down once up has moved).
        self.adapter_down = nn.Linear(d_read, size, **kw)
        self.adapter_up = nn.Linear(size, d_out, **kw)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        self.act = ACTIVATIONS[non_linearity]()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = scaling

    def bottleneck(self, h: torch.Tensor) -> torch.Tensor:
        """The scaled adapter path in the adapter's own dtype."""
        h = self.dropout(h.to(self.adapter_down.weight.dtype))
        return self.scaling * self.adapter_up(self.act(self.adapter_down(h)))

    def make_linear(self, base_layer: nn.Module) -> None:
        """With no activation, on a Linear or Conv1D layer: the adapter changes the weight and bias by fixed
        amounts (see :meth:`merged_tensors`), so it can be merged, and written as a LoRA."""
        self.transposed = not isinstance(base_layer, nn.Linear)
        has_bias = getattr(base_layer, "bias", None) is not None
        self.mergeable = has_bias  # the adapter's own biases need a base bias to land in
        self.merge_into = ("weight", "bias")
        # A sequential adapter maps the layer's output, so its change scales with the weight (like IA3).
        self.additive = self.parallel

    def _maps(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(s U D, s (U d + u)): the adapter's path ``h -> M h + c`` as a matrix and a vector."""
        up, down = self.adapter_up, self.adapter_down
        m = self.scaling * up.weight.to(dtype) @ down.weight.to(dtype)
        c = self.scaling * (up.weight.to(dtype) @ down.bias.to(dtype) + up.bias.to(dtype))
        return m, c

    def _rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T if self.transposed else weight

    def delta_factors(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.mergeable:
            return None
        up, down = self.adapter_up.weight.to(weight.dtype), self.adapter_down.weight.to(weight.dtype)
        # parallel: W x + s U D x;  sequential: (I + s U D) W x, i.e. s U (D W) on top of W x
        return self.scaling * up, down if self.parallel else down @ self._rows(weight)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        left, right = self.delta_factors(weight)
        delta = left @ right
        return delta.T if self.transposed else delta

    def merged_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weight, bias = tensors["weight"], tensors["bias"]
        m, c = self._maps(weight.dtype)
        if self.parallel:  # W x + b + M x + c
            return {"weight": weight + self.delta_weight(weight), "bias": bias + c}
        # (I + M)(W x + b) + c
        return {"weight": weight + self.delta_weight(weight), "bias": bias + m @ bias + c}

    def unmerged_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weight, bias = tensors["weight"], tensors["bias"]
        m, c = self._maps(weight.dtype)
        if self.parallel:
            rows = self._rows(weight) - m
            return {"weight": rows.T if self.transposed else rows, "bias": bias - c}
        grow = torch.eye(m.shape[0], dtype=m.dtype, device=m.device) + m
        rows = torch.linalg.solve(grow, self._rows(weight))
        return {"weight": rows.T if self.transposed else rows, "bias": torch.linalg.solve(grow, bias - c)}

    def delta_output(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        if not isinstance(base_out, torch.Tensor):
            raise UnsupportedLayerError(
                f"{type(base_layer).__name__} returned {type(base_out).__name__}, not a tensor: a bottleneck "
                "adapter can only sit on a module returning hidden states (adapt a layer inside it instead)"
            )
        return self.bottleneck(x if self.parallel else base_out).to(base_out.dtype)


class _Scratch(dict):
    """Activations a hook hands to ``delta_output`` within one forward; never copied or pickled (a
    deep copy of a model must not try to copy tensors that are part of an autograd graph)."""

    def __deepcopy__(self, memo: dict) -> _Scratch:
        return _Scratch()

    def __reduce__(self) -> tuple:
        return (_Scratch, ())


class ResidualOutputAdapter(BottleneckAdapter):
    """Parallel adapter on a BERT-style output module ``LayerNorm(dropout(dense(h)) + residual)``.

    The residual (the module's second argument) is the input of the block this module closes, so it
    feeds the adapter, and the adapter's output joins the sum *before* the LayerNorm (He et al.'s
    placement): the layer computes ``LayerNorm(z + a)`` with ``z`` the sum the module normalises and
    ``a = s * up(act(down(residual)))``, expressed to the core as ``LayerNorm(z + a) - LayerNorm(z)``.
    Two forward pre-hooks, installed by :meth:`attach` and removed by :meth:`detach_from`, hand the
    residual and ``z`` over. Several such adapters active on one module each normalise ``z`` with their
    own ``a`` (their deltas are summed after the LayerNorm).
    """

    def __init__(self, d: int, like: torch.Tensor, **values: Any) -> None:
        super().__init__(d, d, like, **values)
        self._seen = _Scratch()
        self._hooks: list[Any] = []

    def attach(self, base_layer: nn.Module) -> None:
        super().attach(base_layer)
        self._hooks = [
            base_layer.register_forward_pre_hook(self._keep_residual, with_kwargs=True),
            base_layer.LayerNorm.register_forward_pre_hook(self._keep_pre_norm),
        ]

    def release(self, base_layer: nn.Module) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._seen.clear()

    def _keep_residual(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._seen["residual"] = args[1] if len(args) > 1 else kwargs["input_tensor"]

    def _keep_pre_norm(self, module: nn.Module, args: tuple) -> None:
        self._seen["pre_norm"] = args[0]

    def delta_output(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        residual, pre_norm = self._seen.pop("residual", None), self._seen.pop("pre_norm", None)
        if residual is None or pre_norm is None:
            raise UnsupportedLayerError(
                f"{type(base_layer).__name__} did not pass its residual through its LayerNorm as a BERT-style "
                "output module does; adapt its 'dense' layer with a sequential placement instead"
            )
        # The model's own LayerNorm runs in the base dtype with the base's own parameters, so a fresh
        # adapter (a = 0) reproduces the base output exactly; forward() skips the hook that fed pre_norm.
        shifted = pre_norm + self.bottleneck(residual).to(pre_norm.dtype)
        return base_layer.LayerNorm.forward(shifted) - base_out


# -- which modules take which adapter ---------------------------------------------------------------


class _Shape(type):
    """Metaclass of structural layer types: ``isinstance(m, FeedForwardBlock)`` asks about the module's
    shape, so dispatch rows (and the supported-kinds list in errors) can name kinds of blocks that
    every architecture implements with its own class."""

    def __instancecheck__(cls, obj: object) -> bool:
        return isinstance(obj, nn.Module) and cls.matches(obj)


def _forward_arguments(module: nn.Module) -> list[str] | None:
    """Named arguments of ``module.forward`` (None when they cannot be read, e.g. a scripted module)."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    return [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


class FeedForwardBlock(metaclass=_Shape):
    """A module whose forward takes exactly one tensor and which holds at least two linear layers
    (``nn.Linear`` or GPT-2 ``Conv1D``) as direct children: LlamaMLP, GPT2MLP, T5DenseActDense,
    DistilBERT's FFN. Its first linear child reads the block's input, its last writes its output.
    (Attention modules take further arguments, such as the attention mask, and are not blocks.)"""

    @staticmethod
    def matches(module: nn.Module) -> bool:
        linears = [c for c in module.children() if isinstance(c, LINEAR_TYPES)]
        return len(linears) >= 2 and len(_forward_arguments(module) or ()) == 1


class BertStyleOutput(metaclass=_Shape):
    """A module computing ``LayerNorm(dropout(dense(hidden_states)) + input_tensor)``: BERT's
    ``BertOutput`` / ``BertSelfOutput`` and their copies in RoBERTa, ELECTRA, MPNet, DeBERTa (whose
    ``DebertaLayerNorm`` is its own class) and others."""

    @staticmethod
    def matches(module: nn.Module) -> bool:
        norm = getattr(module, "LayerNorm", None)
        return (
            isinstance(getattr(module, "dense", None), nn.Linear)
            and isinstance(norm, nn.Module)
            and is_norm(norm)
            and len(_forward_arguments(module) or ()) == 2
        )


class ExpertsBlock(metaclass=_Shape):
    """A mixture-of-experts feed-forward block whose experts are stacked weights rather than layers
    (Mixtral in transformers 5: a router ``gate`` with an (experts x d) weight, ``experts`` holding 3-D
    tensors), taking one tensor and giving one of the same width."""

    @staticmethod
    def matches(module: nn.Module) -> bool:
        experts = [list(c.parameters(recurse=False)) for c in module.children()]
        return (
            len(_forward_arguments(module) or ()) == 1
            and not any(isinstance(c, LINEAR_TYPES) for c in module.children())
            and _router(module) is not None
            and any(own and all(p.dim() == 3 for p in own) for own in experts)  # one tensor per projection
        )


def _router(module: nn.Module) -> nn.Parameter | None:
    """The router's (experts x d) weight, which gives the block's width d."""
    for child in module.children():
        weight = child._parameters.get("weight")
        if isinstance(weight, nn.Parameter) and weight.dim() == 2 and not isinstance(child, nn.Embedding):
            return weight
    return None


def _no_adapters_inside(module: nn.Module) -> str | None:
    if any(isinstance(m, (AdapterLayer, ModulesToSave)) for m in module.modules()):
        return (
            f"{type(module).__name__} already holds adapted layers; an adapter on a block and another inside "
            "it cannot be combined (adapt the block's output projection instead)"
        )
    return None


def _build_linear(base_layer: nn.Module, **values: Any) -> BottleneckAdapter:
    adapter = BottleneckAdapter(*_widths(base_layer), base_layer.weight, **values)
    if values["non_linearity"] == "identity":
        adapter.make_linear(base_layer)
    return adapter


def _build_block(base_layer: nn.Module, **values: Any) -> BottleneckAdapter:
    # The first linear child reads the block's input, the last one writes its output.
    linears = [c for c in base_layer.children() if isinstance(c, LINEAR_TYPES)]
    return BottleneckAdapter(_widths(linears[0])[0], _widths(linears[-1])[1], linears[-1].weight, **values)


def _build_experts(base_layer: nn.Module, **values: Any) -> BottleneckAdapter:
    router = _router(base_layer)
    return BottleneckAdapter(router.shape[1], router.shape[1], router, **values)


def _build_residual_output(base_layer: nn.Module, **values: Any) -> ResidualOutputAdapter:
    if not values["parallel"]:
        raise UnsupportedLayerError(
            f"a sequential (houlsby/pfeiffer) adapter belongs after the output projection, before the residual "
            f"and LayerNorm of this {type(base_layer).__name__}: target its 'dense' layer instead"
        )
    return ResidualOutputAdapter(base_layer.dense.out_features, base_layer.dense.weight, **values)


register_layer(PEFT_TYPE, "Linear", (nn.Linear,), _build_linear)
if HFConv1D:
    register_layer(PEFT_TYPE, "Conv1D (GPT-2)", (HFConv1D,), _build_linear)
register_layer(
    PEFT_TYPE, "BERT-style output", (BertStyleOutput,), _build_residual_output, _no_adapters_inside
)
register_layer(PEFT_TYPE, "feed-forward block", (FeedForwardBlock,), _build_block, _no_adapters_inside)
register_layer(PEFT_TYPE, "mixture-of-experts block", (ExpertsBlock,), _build_experts, _no_adapters_inside)


__all__ = [
    "BottleneckConfig",
    "BottleneckAdapter",
    "ResidualOutputAdapter",
    "FeedForwardBlock",
    "BertStyleOutput",
    "ExpertsBlock",
    "DEFAULT_TARGETS",
    "PLACEMENT_ROLES",
]

"""What automatic selection may choose from: low-rank adapters on single modules, and whole parameters.

Two kinds of candidate, with their exact costs in trainable parameters:

- :class:`LowRank`: a LoRA adapter on one module that LoRA supports (linear, GPT-2 Conv1D, conv,
  embedding; the registry's dispatch table decides, so quantized layers count when their backend is
  loaded; not grouped convolutions, nor ``nn.MultiheadAttention``, which has no ``weight``). A rank-``k`` adapter on a weight whose 2-D view is ``rows x cols`` costs ``k * (rows + cols)``
  (DoRA adds one magnitude per output channel once the module is chosen).
- :class:`WholeParams`: parameters trained in full. A normalisation layer (LayerNorm, RMSNorm,
  BatchNorm, GroupNorm ...) is trained as a full copy (``modules_to_save``); a small output head that is
  not already trained likewise; every base bias together is the ``bias: all`` option. The same bias can
  belong to two of them (a LayerNorm's bias is also a bias), so each holds parameter names and a choice
  costs only the parameters no earlier choice covers: that is exactly what training them costs.

Modules the run trains anyway (a fresh classification head) are neither candidates nor counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..core import registry
from ..core.counting import count_parameters
from ..core.targeting import output_head_names, sequence_head_names, user_modules

LORA = "LORA"
# Whole small heads (e.g. a classifier already trained for the task) above this size are never
# offered: training a vocabulary-sized output layer in full is not parameter-efficient.
MAX_HEAD_PARAMS = 1_000_000


@dataclass(frozen=True)
class LowRank:
    """A LoRA adapter on module ``name``, whose weight's 2-D view is ``rows x cols``."""

    name: str
    kind: str  # the module's class name, for reports
    rows: int
    cols: int
    out_features: int  # one DoRA magnitude each
    # where LoRA's zero-initialised factor B writes: the weight's rows (Linear, conv) or its columns
    # (GPT-2's Conv1D stores in x out; an embedding's B maps into the embedding dimension)
    output_on_rows: bool = True

    @property
    def cost_per_rank(self) -> int:
        return self.rows + self.cols

    @property
    def max_rank(self) -> int:
        return min(self.rows, self.cols)


@dataclass(frozen=True)
class WholeParams:
    """Parameters trained in full: ``option`` is how a config says so ("module" = ``modules_to_save``
    entry ``name``; "bias" = ``bias: all``); ``params`` maps each parameter's full name to its size."""

    name: str
    kind: str
    option: str
    params: dict[str, int] = field(hash=False)


@dataclass
class Candidates:
    low_rank: list[LowRank]
    whole: list[WholeParams]
    # trained by the run whatever is selected (fresh heads): reported, not counted in the budget
    always_trained: list[str]
    total_params: int


_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.batchnorm._NormBase,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer: a torch one, or a model's own (LlamaRMSNorm, T5LayerNorm ...) judged by
    its class name, since transformers defines its own RMSNorm classes per architecture."""
    name = type(module).__name__.lower()
    return isinstance(module, _NORM_TYPES) or name.rstrip("123d").endswith(
        ("layernorm", "rmsnorm", "groupnorm", "batchnorm")
    )


def find_candidates(
    model: nn.Module,
    always_trained: list[str] | None = None,
    whole_params: bool = True,
    embeddings: bool = True,
) -> Candidates:
    """Every candidate on ``model`` (which must not hold adapters yet).

    Args:
        model: The base model.
        always_trained: Modules the run trains in full anyway; default: the fresh sequence heads.
        whole_params: Also offer normalisation layers, biases and small heads.
        embeddings: Also offer LoRA on embedding tables.
    """
    names = [n for n, _ in user_modules(model) if n]
    specs = sequence_head_names(model) if always_trained is None else always_trained
    # matched as modules_to_save is (the reference's plain suffix rule)
    always = [n for n in names if any(n.endswith(s) for s in specs)]
    always_prefixes = tuple(n + "." for n in always)
    heads = output_head_names(model)
    low_rank: list[LowRank] = []
    whole: list[WholeParams] = []
    # a tied parameter (an output head sharing the input embedding) is known by its first name only
    canonical = {id(p): n for n, p in model.named_parameters()}
    # read by its attention module, never called: targeting refuses it (LoRA adapts the attention whole)
    unreachable = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    for name, module in user_modules(model):
        if not name or name in always or name.startswith(always_prefixes) or id(module) in unreachable:
            continue
        own = {canonical[id(p)]: p.numel() for _, p in module.named_parameters(recurse=False)}
        if is_norm(module):
            if whole_params and own:
                whole.append(WholeParams(name, type(module).__name__, "module", own))
            continue
        row, _ = registry.dispatch(LORA, module)
        if row is None or name in heads:
            if whole_params and name in heads and own and sum(own.values()) <= MAX_HEAD_PARAMS:
                whole.append(WholeParams(name, type(module).__name__, "module", own))
            continue
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() < 2 or (isinstance(module, nn.Embedding) and not embeddings):
            continue
        if getattr(module, "groups", 1) != 1:
            # a grouped conv's LoRA has ranks in multiples of its groups and a dense delta: not priced here
            continue
        shape = getattr(getattr(weight, "quant_state", None), "shape", None) or weight.shape
        # the stored layout's 2-D view: (out, in) for Linear, (in, out) for GPT-2's Conv1D, (out, in*k*k)
        # for a conv; cost and singular values are the same either way round
        rows, cols = int(shape[0]), int(_prod(shape[1:]))
        # Linear and conv weights lead with their outputs; GPT-2's Conv1D and an embedding table end with them
        on_rows = not (isinstance(module, nn.Embedding) or type(module).__name__ == "Conv1D")
        low_rank.append(LowRank(name, type(module).__name__, rows, cols, rows if on_rows else cols, on_rows))
    if whole_params:
        biases = {
            n: p.numel()
            for n, p in model.named_parameters()
            if n.endswith(".bias") and not n.startswith(always_prefixes) and n.rsplit(".", 1)[0] not in always
        }
        if biases:
            whole.append(WholeParams("(all biases)", "bias", "bias", biases))
    _, total = count_parameters(model)
    return Candidates(low_rank, whole, always, total)


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out

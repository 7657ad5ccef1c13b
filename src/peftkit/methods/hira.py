"""HiRA: Hadamard high-rank adaptation (Huang et al., ICLR 2025, openreview.net/forum?id=TwJrTz9cRS).

LoRA adds a low-rank ``B A`` to the frozen weight. HiRA multiplies it, entry by entry, into the frozen
weight instead (the paper's eq. 4): ``ΔW = W0 ⊙ (B A)`` with A (r x in) and B (out x r). A Hadamard
product with the full-rank ``W0`` lifts the update's rank far beyond ``r`` (up to ``rank(W0) · r``)
for the same parameter count as LoRA, and the update is shaped by the pretrained weight: entries that
are zero in ``W0`` never move. There is no scaling factor.

Per layer kind, in the reference library's (peft 0.21.2) tensor names and shapes, ``M = B A`` laid out
like the base weight:

* ``nn.Linear`` and GPT-2's ``Conv1D``: ``hira_A`` (r, in), ``hira_B`` (out, r); ``y = base(x) + x (W0 ⊙ M)ᵀ``.
* ``nn.Embedding``: ``hira_embedding_A`` (r, vocab), ``hira_embedding_B`` (dim, r); the delta of token
  ``t`` is row ``t`` of ``W0 ⊙ Mᵀ``, i.e. ``W0[t] ⊙ (Aᵀ[t] Bᵀ)`` (looked up, never formed in full).
* ``nn.Conv1d/2d/3d``: ``hira_A`` (r, in, *kernel), ``hira_B`` (out, r, 1, ...); ``M`` is their product
  read as a kernel, and the layer also convolves with ``W0 ⊙ M`` (same stride, padding, dilation).

Merging writes ``W0 ⊙ (1 + M)``: the delta depends on the weight it is merged into, so an adapter
merges only when alone on its layer (``additive = False``), and unmerging divides by ``1 + M``.

Init (``init_weights``): ``True``, A Kaiming-uniform and B zero; ``"gaussian"``, A ~ N(0, 1/r) on linear
layers (a convolution keeps Kaiming, as in the reference); on embeddings A zero and B ~ N(0, 1) for
either; all three start at the base model. ``False``: A and B standard normal (for tests).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core import checks
from ..core.config import AdapterConfig
from ..core.layer import AdapterModule, adapter_dtype
from ..core.registry import register_layer, register_method
from ..core.targeting import HFConv1D, Target
from .lora import LoraConfig

PEFT_TYPE = "HIRA"


@register_method(PEFT_TYPE)
@dataclass
class HiraConfig(AdapterConfig):
    """Hadamard high-rank adaptation: each targeted weight changes by ``W0 ⊙ (B A)``.

    Attributes:
        r: Rank of the factors A and B, the same on every layer (the reference's default, 32). The
            update itself has rank up to ``rank(W0) · r``. ``rank_pattern`` is kept in the file but
            ignored, with a warning, as the reference ignores it when it builds a layer.
        hira_dropout: Dropout on the adapter's input during training (not on embeddings, as in the
            reference).
        fan_in_fan_out: Recorded for the interchange format; the layout is read from the layer type
            (GPT-2's ``Conv1D`` stores its weight transposed), as the reference does for HiRA.
        init_weights: ``True`` (A Kaiming-uniform, B zero), ``"gaussian"`` (A ~ N(0, 1/r) on linear
            layers) or ``False`` (A and B standard normal: the adapter changes the output at once; for
            tests).
    """

    pick_when = "you want a high-rank update at LoRA's parameter count, shaped by the pretrained weight (the delta is W0 times a low-rank matrix, entry-wise)"

    fields_not_in_format: ClassVar[tuple[str, ...]] = ("alpha_pattern",)  # HiRA has no alpha

    r: int = 32
    hira_dropout: float = 0.0
    fan_in_fan_out: bool = False
    init_weights: bool | str = True

    # The reference library's HiRA defaults per architecture are a copy of its LoRA table.
    default_targets: ClassVar[dict[str, list[str]]] = LoraConfig.default_targets
    target_roles: ClassVar[tuple[str, ...]] = LoraConfig.target_roles
    own_default_types: ClassVar[tuple[str, ...]] = LoraConfig.own_default_types
    display_name: ClassVar[str] = "HiRA"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank_pattern:
            warnings.warn(
                f"HiRA rank_pattern={self.rank_pattern!r} is ignored: the reference library (peft 0.21.2) builds "
                f"every HiRA layer at r={self.r} whatever rank_pattern says, and peftkit does the same so that "
                "adapter files mean the same in both. Use separate adapters for different ranks.",
                stacklevel=3,
            )

    def problems(self) -> list[str]:
        out = super().problems()
        out += checks.positive_ints(self, "r")
        out += checks.dropout(self, "hira_dropout")
        out += checks.booleans(self, "fan_in_fan_out")
        if not (isinstance(self.init_weights, bool) or self.init_weights == "gaussian"):
            out.append(f"init_weights: must be True, False or 'gaussian', got {self.init_weights!r}")
        if self.alpha_pattern:
            out.append(
                "alpha_pattern: HiRA has no alpha (the update is W0 ⊙ BA, unscaled; the reference format has "
                "no alpha_pattern); drop it"
            )
        return out

    def layer_values(self, target: Target) -> dict[str, Any]:
        # not target.rank: the reference ignores rank_pattern when it builds a layer (see __post_init__)
        return {"r": int(self.r), "dropout": float(self.hira_dropout), "init": self.init_weights}


class HiraAdapter(AdapterModule):
    """HiRA's algebra on one layer; a subclass owns the factors and says how ``M = B A`` is laid out."""

    # W0 ⊙ M: the delta depends on the weight merged into, so the core merges it only alone on its layer.
    additive = False

    def __init__(self, r: int, dropout: float) -> None:
        super().__init__()
        self.r = r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def modulation(self, like: torch.Tensor) -> torch.Tensor:
        """``M = B A`` in the layout of the base weight ``like`` (same shape)."""
        raise NotImplementedError

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.modulation(weight).to(weight.dtype)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        # W0 ⊙ (1 + M), one rounding per entry, so that unmerging (a division by the same 1 + M) gives W0
        # back to a relative error of about two roundings however small an entry of 1 + M is.
        return weight * (1 + self.modulation(weight).to(weight.dtype))

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        # An entry where 1 + M is exactly 0 merged to 0 and cannot come back (docs/hira.md).
        return weight / (1 + self.modulation(weight).to(weight.dtype))

    def _init(self, a: torch.Tensor, b: torch.Tensor, init: bool | str, gaussian: bool) -> None:
        with torch.no_grad():
            if init is False:  # the reference draws both from N(0, 1)
                nn.init.normal_(a), nn.init.normal_(b)
                return
            if init == "gaussian" and gaussian:
                nn.init.normal_(a, std=1 / self.r)
            else:  # the default of nn.Linear / nn.Conv for A; B zero: the adapter starts at the base
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)


class HiraLinear(HiraAdapter):
    """HiRA on ``nn.Linear`` and on transformers' GPT-2 ``Conv1D`` (weight stored as in x out)."""

    def __init__(self, base_layer: nn.Module, r: int, dropout: float, init: bool | str) -> None:
        super().__init__(r, dropout)
        weight = base_layer.weight
        self.transposed = not isinstance(base_layer, nn.Linear)
        out_f, in_f = (weight.shape[1], weight.shape[0]) if self.transposed else weight.shape
        kw = {"device": weight.device, "dtype": adapter_dtype(weight)}
        self.hira_A = nn.Parameter(torch.empty(r, in_f, **kw))
        self.hira_B = nn.Parameter(torch.empty(out_f, r, **kw))
        self._init(self.hira_A, self.hira_B, init, gaussian=True)

    def modulation(self, like: torch.Tensor) -> torch.Tensor:
        m = self.hira_B @ self.hira_A
        return m.T if self.transposed else m

    def delta_output(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        dtype = self.hira_A.dtype
        weight = base_layer.weight.to(dtype)
        rows = weight.T if self.transposed else weight  # (out, in)
        # HiRA forms the dense W0 ⊙ BA each step (the paper's cost); r separate products would cost r matmuls
        return F.linear(self.dropout(x.to(dtype)), rows * (self.hira_B @ self.hira_A)).to(base_out.dtype)


class HiraEmbedding(HiraAdapter):
    """HiRA on ``nn.Embedding``: the looked-up rows of ``W0`` times the looked-up rows of ``(B A)ᵀ``."""

    def __init__(self, base_layer: nn.Embedding, r: int, dropout: float, init: bool | str) -> None:
        super().__init__(r, 0.0)  # the input is token ids; the reference has no dropout here either
        weight = base_layer.weight
        num, dim = weight.shape
        kw = {"device": weight.device, "dtype": adapter_dtype(weight)}
        self.hira_embedding_A = nn.Parameter(torch.empty(r, num, **kw))
        self.hira_embedding_B = nn.Parameter(torch.empty(dim, r, **kw))
        with torch.no_grad():
            if init is False:
                nn.init.normal_(self.hira_embedding_A), nn.init.normal_(self.hira_embedding_B)
            else:  # the LoRA paper's embedding init, which the reference uses for HiRA: A zero, B normal
                nn.init.zeros_(self.hira_embedding_A)
                nn.init.normal_(self.hira_embedding_B)

    def modulation(self, like: torch.Tensor) -> torch.Tensor:
        return (self.hira_embedding_B @ self.hira_embedding_A).T  # (vocab, dim), as the weight

    def delta_output(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        # A plain lookup (no padding_idx / max_norm), as the reference's: the same values, and A's column of
        # the padding token trains as it does there.
        dtype = self.hira_embedding_A.dtype
        rows = F.embedding(x, base_layer.weight).to(dtype)
        mod = F.embedding(x, self.hira_embedding_A.T) @ self.hira_embedding_B.T
        return (rows * mod).to(base_out.dtype)


class HiraConv(HiraAdapter):
    """HiRA on ``nn.Conv1d/2d/3d``: the layer also convolves with ``W0 ⊙ M``, M the factors' product as a
    kernel (A carries the kernel's extent, B is 1x1), with the base's own stride, padding and dilation."""

    def __init__(self, base_layer: nn.modules.conv._ConvNd, r: int, dropout: float, init: bool | str) -> None:
        super().__init__(r, dropout)
        weight = base_layer.weight
        kw = {"device": weight.device, "dtype": adapter_dtype(weight)}
        ones = (1,) * (weight.dim() - 2)
        self.hira_A = nn.Parameter(torch.empty(r, base_layer.in_channels, *base_layer.kernel_size, **kw))
        self.hira_B = nn.Parameter(torch.empty(base_layer.out_channels, r, *ones, **kw))
        # the reference's conv init has no Gaussian branch: "gaussian" means Kaiming there too
        self._init(self.hira_A, self.hira_B, init, gaussian=False)

    def modulation(self, like: torch.Tensor) -> torch.Tensor:
        m = self.hira_B.reshape(-1, self.r) @ self.hira_A.reshape(self.r, -1)
        return m.reshape(like.shape)

    def delta_output(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        dtype = self.hira_A.dtype
        weight = base_layer.weight.to(dtype)
        kernel = weight * self.modulation(weight)
        # _conv_forward: the base's padding mode too, so that the unmerged output is the merged one's
        return base_layer._conv_forward(self.dropout(x.to(dtype)), kernel, None).to(base_out.dtype)


def _conv_check(module: nn.Module) -> str | None:
    if module.groups != 1:
        # W0 ⊙ M needs M in the weight's shape; a grouped weight's has no low-rank product (the reference refuses)
        return f"groups={module.groups} (grouped or depthwise convolution) is not supported by HiRA"
    return None


register_layer(PEFT_TYPE, "Linear", (nn.Linear,), HiraLinear)
if HFConv1D:
    register_layer(PEFT_TYPE, "Conv1D (GPT-2)", (HFConv1D,), HiraLinear)
register_layer(PEFT_TYPE, "Embedding", (nn.Embedding,), HiraEmbedding)
register_layer(PEFT_TYPE, "Conv", (nn.Conv1d, nn.Conv2d, nn.Conv3d), HiraConv, check=_conv_check)


__all__ = ["HiraConfig", "HiraLinear", "HiraEmbedding", "HiraConv"]

"""LoRA on embeddings and convolutions, and the dispatch rows of every LoRA layer kind but the linear ones.

These adapters share all of ``LoraAdapter`` (``methods/lora.py``) and differ only in how their base kind
stores its weight, so they live apart from the config and the linear adapter to keep each file readable in
one sitting. They import ``lora``, never the other way round: the package's ``__init__`` imports every
module, so this one registers itself with no edit elsewhere.

The rows are added here in the order ``lora.py`` used to add them: Linear and GPT-2's Conv1D (``lora.py``,
which is always imported first, since this module imports it), then Embedding, Conv and MultiheadAttention.
The kinds match disjoint classes, so dispatch does not depend on it, but error messages and the methods
table (``docs/methods.md``'s "layer kinds") list the kinds in row order.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.layer import adapter_dtype as _adapter_dtype
from ..core.registry import register_layer
from ..errors import UnsupportedLayerError
from .lora import PEFT_TYPE, LoraAdapter
from .lora_mha import LoraMultiheadAttention, check_attention


class LoraEmbedding(LoraAdapter):
    """LoRA on ``nn.Embedding``: A (r x vocab) is looked up like an embedding table, then B (dim x r)."""

    def __init__(self, base_layer: nn.Embedding, **values: Any) -> None:
        values["dropout"] = 0.0  # the input is token ids
        if values.get("lora_bias"):
            raise UnsupportedLayerError(
                "lora_bias=True is not supported on embeddings (nor in the reference library): an embedding has no "
                "bias to merge into; exclude the embedding from target_modules or set lora_bias=False"
            )
        super().__init__(**values)
        weight = base_layer.weight
        num, dim = weight.shape
        kw = {"device": weight.device, "dtype": _adapter_dtype(weight)}
        # Parameters, not modules: the interchange names are ".lora_embedding_A" with no ".weight".
        self.lora_embedding_A = nn.Parameter(torch.randn(self.r, num, **kw))
        self.lora_embedding_B = nn.Parameter(torch.randn(dim, self.r, **kw))
        self._lookup = {
            k: getattr(base_layer, k)
            for k in ("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
        }
        self._new_magnitude((dim,), weight)
        if self.init is not False:  # the LoRA paper's embedding init: A zero, B normal
            nn.init.zeros_(self.lora_embedding_A)
            nn.init.normal_(self.lora_embedding_B)

    def lora_path(self, x, base_layer):
        return F.embedding(x, self.lora_embedding_A.T, **self._lookup) @ self.lora_embedding_B.T

    def rows(self, weight):
        return weight.T

    def unrows(self, rows, like):
        return rows.T

    def base_without_bias(self, x, base_layer):
        return F.embedding(x, base_layer.weight, **self._lookup)

    def param_roles(self):
        return {"A": [self.lora_embedding_A], "B": [self.lora_embedding_B], "embedding": True}


class LoraConv(LoraAdapter):
    """LoRA on ``nn.Conv1d/2d/3d``: A is a conv with the base's kernel, stride, padding and dilation
    into r channels, B a 1x1 conv back out; their product is a kernel of the base's shape.

    On a grouped or depthwise convolution (``groups = G > 1``) the layout is the reference library's: A
    still reads every input channel, and B is a grouped 1x1 conv (G groups of r/G channels each, so r must
    be a multiple of G). Their product is then a dense kernel that the grouped weight cannot hold: such an
    adapter is not mergeable (the reference refuses too). DoRA's norm there follows the reference as well:
    the product ``B.reshape(-1, r) @ A.reshape(r, -1)`` read in the kernel's shape (not the kernel the
    adapter applies), so that trained magnitudes mean the same in both libraries.
    """

    channel_dim = 1

    def __init__(self, base_layer: nn.modules.conv._ConvNd, **values: Any) -> None:
        super().__init__(**values)
        weight = base_layer.weight
        self.groups = base_layer.groups
        if self.r % self.groups:
            fit = -(-self.r // self.groups) * self.groups
            raise UnsupportedLayerError(
                f"LoRA on a convolution with groups={self.groups} needs a rank divisible by {self.groups} (B is "
                f"a grouped 1x1 convolution, the reference library's layout); got r={self.r}. Give this layer "
                f"r={fit} through rank_pattern, or leave it out (exclude_modules)."
            )
        if self.groups > 1:
            self.mergeable = False
            self.unmergeable_reason = (
                f"on a convolution with groups={self.groups} LoRA's delta is a dense kernel, which the grouped "
                "weight cannot hold; the reference library refuses it too"
            )
        kw = {"bias": False, "device": weight.device, "dtype": _adapter_dtype(weight)}
        conv = next(c for c in (nn.Conv1d, nn.Conv2d, nn.Conv3d) if isinstance(base_layer, c))
        # A subclass whose forward does more than the convolution (e.g. TensorFlow-style "same"
        # padding first, as EfficientNet ports do) is run as itself, with the low-rank kernel swapped in.
        self.through_base = type(base_layer).forward is not conv.forward
        self.lora_A = conv(
            base_layer.in_channels,
            self.r,
            base_layer.kernel_size,
            base_layer.stride,
            base_layer.padding,
            base_layer.dilation,
            padding_mode=base_layer.padding_mode,
            **kw,
        )
        self.lora_B = conv(
            self.r, base_layer.out_channels, 1, groups=self.groups, **{**kw, "bias": self.lora_bias}
        )
        ones = (1,) * (weight.dim() - 2)
        self._new_magnitude((1, base_layer.out_channels, *ones), weight)  # the reference's layout
        if self.init is True:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        elif self.init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
            nn.init.zeros_(self.lora_B.weight)
        self._new_bias(base_layer, self.lora_B)

    def lora_path(self, x, base_layer):
        if not self.through_base:
            return self.lora_B(self.lora_A(x))
        if self.groups == 1:
            out = _with_params(base_layer, x, self.unrows(self.lora_rows(), base_layer.weight))
            if self.lora_bias:
                out = out + self.lora_B.bias.view(1, -1, *[1] * (out.dim() - 2))
            return out
        # The base's own forward convolves each group of input channels apart, but A reads them all: A's
        # kernel cut by input group runs as G groups of r outputs, and summing the groups gives A's output.
        a = self.lora_A.weight
        per_group = a.unflatten(1, (self.groups, -1)).transpose(0, 1).flatten(0, 1)  # (G*r, in/G, *k)
        return self.lora_B(_with_params(base_layer, x, per_group).unflatten(1, (self.groups, self.r)).sum(1))

    def lora_rows(self):
        product = self.lora_B.weight.reshape(-1, self.r) @ self.lora_A.weight.reshape(self.r, -1)
        return product.reshape(self.lora_B.weight.shape[0], -1)  # grouped: in the kernel's shape, see above

    def delta_factors(self, weight):
        # a grouped B is not one (out x r) matrix: combine and convert read the dense delta instead
        return super().delta_factors(weight) if self.groups == 1 else None

    def rows(self, weight):
        return weight.reshape(weight.shape[0], -1)

    def unrows(self, rows, like):
        return rows.reshape(like.shape)

    def base_without_bias(self, x, base_layer):
        if self.through_base:
            return _with_params(base_layer, x, base_layer.weight.to(x.dtype))
        return base_layer._conv_forward(x, base_layer.weight.to(x.dtype), None)

    def param_roles(self):
        return {"A": [self.lora_A.weight], "B": [self.lora_B.weight]}


def _with_params(conv: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``conv``'s own forward on ``x`` with ``weight`` in place of its kernel and no bias."""
    params = {"weight": weight}
    if conv.bias is not None:
        params["bias"] = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    return torch.func.functional_call(conv, params, (x,))


register_layer(PEFT_TYPE, "Embedding", (nn.Embedding,), LoraEmbedding)
register_layer(PEFT_TYPE, "Conv", (nn.Conv1d, nn.Conv2d, nn.Conv3d), LoraConv)
register_layer(
    PEFT_TYPE, "MultiheadAttention", (nn.MultiheadAttention,), LoraMultiheadAttention, check=check_attention
)


__all__ = ["LoraEmbedding", "LoraConv"]

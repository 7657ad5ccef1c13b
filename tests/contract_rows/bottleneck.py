"""Bottleneck adapters: sequential (Houlsby / Pfeiffer) and parallel, on every kind of module they wrap.

Besides the tiny one-layer nets (Linear, Conv1D), two kinds are built here: a Llama feed-forward block
(``FeedForwardBlock``) and a BERT output module called as ``layer(hidden_states, residual)``
(``BertStyleOutput``), which only takes parallel adapters.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, LlamaConfig
from transformers.models.bert.modeling_bert import BertOutput
from transformers.models.llama.modeling_llama import LlamaMLP

from contract_rows import Row
from peftkit.methods.bottleneck import BottleneckConfig
from support.tiny import Net, build, build_with_bias


class ResidualNet(nn.Module):
    """``head(layer(act(pre(x)), x))``: the BERT feed-forward block's second half, with its residual."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(6, 10)
        self.layer = BertOutput(BertConfig(hidden_size=6, intermediate_size=10, hidden_dropout_prob=0.0))
        nn.init.normal_(self.layer.LayerNorm.weight)  # not the identity, so the LayerNorm's parameters matter
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(F.gelu(self.pre(x)), x))


def _build(kind: str):
    torch.manual_seed(0)
    if kind == "LlamaMLP":
        x = torch.randn(4, 6)
        return Net(
            LlamaMLP(
                LlamaConfig(hidden_size=6, intermediate_size=10, num_attention_heads=2, num_key_value_heads=2)
            ),
            x,
        ), x
    if kind == "BertOutput":
        return ResidualNet(), torch.randn(4, 6)
    return build(kind)


def _config(placement, non_linearity="gelu"):
    return lambda kind: BottleneckConfig(
        placement=placement,
        bottleneck_size=3,
        non_linearity=non_linearity,
        target_modules=["layer"],
        modules_to_save=["head"],
    )


ROWS = [
    Row(
        name="bottleneck-houlsby",
        config=_config("houlsby"),
        kinds=["Linear", "Conv1D", "LlamaMLP"],
        mergeable=False,
        build=_build,
    ),
    Row(
        name="bottleneck-parallel",
        config=_config("parallel"),
        kinds=["Linear", "Conv1D", "LlamaMLP", "BertOutput"],
        mergeable=False,
        build=_build,
    ),
    # no activation on a linear layer: a fixed weight and bias change, so it merges (docs/bottleneck.md)
    *(
        Row(
            name=f"bottleneck-{placement}-identity",
            config=_config(placement, "identity"),
            kinds=["Linear", "Conv1D"],
            build=build_with_bias,
        )
        for placement in ("houlsby", "parallel")
    ),
]

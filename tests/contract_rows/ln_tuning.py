"""LN tuning on each normalisation layer kind it supports, and on the linear, conv and embedding layers the
reference library's LN tuning also takes (a full trainable copy each)."""

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from contract_rows import Row
from peftkit.methods.ln_tuning import LNTuningConfig
from support import tiny
from support.tiny import Net

NORM_KINDS = ["LayerNorm", "LayerNormNoBias", "RMSNorm", "LlamaRMSNorm"]
LAYER_KINDS = ["Linear", "Conv1D", "Embedding", "Conv2d", "Conv2dGroups"]
KINDS = NORM_KINDS + LAYER_KINDS


def build(kind: str, seed: int = 0) -> tuple[Net, torch.Tensor]:
    if kind in tiny.GROUPED_KINDS:
        return tiny.build_grouped(kind, seed)
    if kind in LAYER_KINDS:
        return tiny.build(kind, seed)
    torch.manual_seed(seed)
    layer = {
        "LayerNorm": lambda: nn.LayerNorm(6),
        "LayerNormNoBias": lambda: nn.LayerNorm(6, bias=False),
        "RMSNorm": lambda: nn.RMSNorm(6),
        "LlamaRMSNorm": lambda: LlamaRMSNorm(6),
    }[kind]()
    with torch.no_grad():  # not the identity init, so a wrong merge shows
        for param in layer.parameters():
            param.normal_(1.0, 0.3)
    return Net(layer, torch.randn(4, 6)), torch.randn(4, 6)


ROWS = [
    Row(
        name="ln_tuning",
        config=lambda kind: LNTuningConfig(target_modules=["layer"], modules_to_save=["head"]),
        kinds=KINDS,
        build=build,
    ),
]

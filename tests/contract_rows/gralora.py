"""GraLoRA (granular LoRA): a 2 x 2 grid, Hybrid GraLoRA, one block (k = 1: LoRA's layout) and a random init,
on the reference's two layer kinds."""

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from contract_rows import Row
from peftkit.methods.gralora import GraloraConfig
from support.tiny import Net


def build_even(kind: str, seed: int = 0) -> tuple[Net, torch.Tensor]:
    """Layers whose input and output features are even (the tiny nets' 5 outputs fit no 2 x 2 grid)."""
    torch.manual_seed(seed)
    if kind == "Linear":
        layer, x = nn.Linear(6, 4), torch.randn(4, 6)
    else:  # GPT-2 style, weight stored (in, out)
        layer, x = Conv1D(4, 6), torch.randn(4, 6)
        nn.init.normal_(layer.weight, std=0.3)
    return Net(layer, x), x


VARIANTS = {
    "gralora": {"r": 2},
    "gralora-hybrid": {"r": 2, "hybrid_r": 2},
    "gralora-k1": {"r": 2, "gralora_k": 1},
    "gralora-random-init": {"r": 2, "hybrid_r": 1, "init_weights": False},
}


def _config(options):
    return lambda kind: GraloraConfig(alpha=4, target_modules=["layer"], modules_to_save=["head"], **options)


ROWS = [
    Row(
        name=name,
        config=_config(options),
        kinds=["Linear", "Conv1D"],  # the reference's GraLoRA layer kinds
        build=build_even,
        dtypes=["fp32", "bf16"] if name == "gralora" else ["fp32"],
        starts_at_base=name != "gralora-random-init",
    )
    for name, options in VARIANTS.items()
]

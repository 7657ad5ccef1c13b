"""BOFT (butterfly orthogonal finetuning): one factor (OFT with dense blocks), a butterfly of two factors,
a random init."""

import torch
from torch import nn

from contract_rows import Row
from peftkit.methods.boft import BOFTConfig
from support.tiny import Net, build

# Input features each tiny layer turns (Linear: 6; Conv2d: 3x3x3) and a block size dividing them.
BLOCK = {"Linear": 3, "Conv2d": 9}


def build_butterfly(kind: str, seed: int = 0) -> tuple[Net, torch.Tensor]:
    """Layers whose turned features (Linear: 8; Conv2d: 4x3x3 = 36) fit two factors of 2x2 blocks."""
    torch.manual_seed(seed)
    if kind == "Linear":
        layer, x = nn.Linear(8, 5), torch.randn(4, 8)
    else:
        layer, x = nn.Conv2d(4, 3, 3, padding=2, dilation=2), torch.randn(2, 4, 6, 6)
    return Net(layer, x), x


def _config(options, blocks=None):
    def make(kind):
        size = {"boft_block_size": blocks[kind]} if blocks else {}
        return BOFTConfig(target_modules=["layer"], modules_to_save=["head"], **size, **options)

    return make


ROWS = [
    Row(name="boft", config=_config({}, BLOCK), kinds=["Linear", "Conv2d"], build=build),
    Row(
        name="boft-butterfly",
        config=_config({"boft_block_size": 2, "boft_n_butterfly_factor": 2}),
        kinds=["Linear", "Conv2d"],
        build=build_butterfly,
    ),
    Row(
        name="boft-random-init",
        config=_config({"init_weights": False}, BLOCK),
        kinds=["Linear", "Conv2d"],
        dtypes=["fp32"],
        starts_at_base=False,
    ),
]

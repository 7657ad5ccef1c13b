"""MiSS (matrix shard sharing): the balance form (a padded last shard), mini, bat, a random start."""

import torch
from torch import nn

from contract_rows import Row
from peftkit.methods.miss import MissConfig
from support.tiny import Net, build


def build_square_blocks(kind: str, seed: int = 0) -> tuple[Net, torch.Tensor]:
    """A 6 -> 4 linear layer: 2x2 blocks tile its weight (bat needs r to divide both sides)."""
    torch.manual_seed(seed)
    layer, x = nn.Linear(6, 4), torch.randn(4, 6)
    return Net(layer, x), x


VARIANTS = {
    "miss": ({"r": 4}, build),  # 6 input features: the second shard is zero-padded
    "miss-mini": ({"r": 2, "init_weights": "mini", "mini_r": 5}, build),
    "miss-bat": ({"r": 2, "init_weights": "bat"}, build_square_blocks),
    "miss-random-init": ({"r": 3, "init_weights": False}, build),
}


def _config(options):
    return lambda kind: MissConfig(target_modules=["layer"], modules_to_save=["head"], **options)


ROWS = [
    Row(
        name=name,
        config=_config(options),
        kinds=["Linear"],  # the reference's one MiSS layer kind
        build=builder,
        dtypes=["fp32"] if name == "miss-random-init" else ["fp32", "bf16"],
        starts_at_base=name != "miss-random-init",
    )
    for name, (options, builder) in VARIANTS.items()
]

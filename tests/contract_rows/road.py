"""RoAd (2-D rotary adaptation): its three variants, and a random init."""

import torch
from torch import nn

from contract_rows import Row
from peftkit.methods.road import RoadConfig
from support.tiny import Net


def build_even(kind: str, seed: int = 0) -> tuple[Net, torch.Tensor]:
    """A 6 -> 4 linear layer with a bias: its outputs make groups of 2 and 4 features (RoAd pairs outputs)."""
    torch.manual_seed(seed)
    layer, x = nn.Linear(6, 4), torch.randn(4, 6)
    return Net(layer, x), x


VARIANTS = {
    "road": {"group_size": 4},  # road_1: one angle and scale per pair
    "road-2": {"variant": "road_2", "group_size": 2},
    "road-4": {"variant": "road_4", "group_size": 4},
    "road-random-init": {"variant": "road_4", "group_size": 2, "init_weights": False},
}


def _config(options):
    return lambda kind: RoadConfig(target_modules=["layer"], modules_to_save=["head"], **options)


ROWS = [
    Row(
        name=name,
        config=_config(options),
        kinds=["Linear"],  # the reference's one RoAd layer kind
        build=build_even,
        dtypes=["fp32"] if name == "road-random-init" else ["fp32", "bf16"],
        starts_at_base=name != "road-random-init",
    )
    for name, options in VARIANTS.items()
]

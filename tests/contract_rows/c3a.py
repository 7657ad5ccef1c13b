"""C3A: the zero init (starts at the base) and a random one, on a Linear layer whose sizes a block of 2 divides."""

import torch
from torch import nn

from contract_rows import Row
from peftkit.methods.c3a import C3AConfig
from support.tiny import Net


def _build(kind, seed=0):
    # the tiny nets' Linear (6 -> 5) has only block size 1 in common; C3A's blocks need a shared divisor
    torch.manual_seed(seed)
    layer, x = nn.Linear(8, 6), torch.randn(4, 8)
    return Net(layer, x), x


def _config(init_weights):
    return lambda kind: C3AConfig(
        block_size=2, target_modules=["layer"], modules_to_save=["head"], init_weights=init_weights
    )


ROWS = [
    Row(name="c3a", config=_config(True), kinds=["Linear"], build=_build),
    Row(
        name="c3a-gaussian", config=_config("gaussian"), kinds=["Linear"], build=_build, starts_at_base=False
    ),
]

"""BitFit on every layer kind that has a bias: the tiny nets of ``_tiny.py`` (Embedding has none)
plus norm layers, whose bias is a shift after normalisation."""

import torch
from torch import nn

from contract_rows import Row
from peftkit.methods.bitfit import BitFitConfig
from support.tiny import KINDS, Net, build

NORM_KINDS = ["LayerNorm", "BatchNorm2d", "GroupNorm"]


def build_with_norms(kind: str, seed: int = 0) -> tuple[Net, torch.Tensor]:
    if kind not in NORM_KINDS:
        model, x = build(kind, seed)
        if kind == "Conv1D":
            # transformers starts Conv1D's bias at zero; the contract's bf16 unmerge tolerance is
            # relative to the tensor's size, so give it a trained-looking bias as real models have
            with torch.no_grad():
                model.layer.bias.normal_(0.0, 0.3)
        return model, x
    torch.manual_seed(seed)
    if kind == "LayerNorm":
        layer, x = nn.LayerNorm(6), torch.randn(4, 6)
    elif kind == "BatchNorm2d":
        layer, x = nn.BatchNorm2d(3), torch.randn(2, 3, 4, 4)
        layer.running_mean.normal_(), layer.running_var.uniform_(0.5, 2.0)
    else:
        layer, x = nn.GroupNorm(2, 4), torch.randn(2, 4, 5)
    with torch.no_grad():  # not the identity init, so a wrong merge or broadcast shows
        layer.weight.normal_(1.0, 0.3), layer.bias.normal_(0.0, 0.3)
    return Net(layer, x), x


ROWS = [
    Row(
        name="bitfit",
        config=lambda kind: BitFitConfig(target_modules=["layer"], modules_to_save=["head"]),
        kinds=[k for k in KINDS if k != "Embedding"] + NORM_KINDS,
        build=build_with_norms,
    ),
    # the default selection (every module with a bias) on the same nets: here "layer" and "head"
    # both have one, and "head" is trained in full instead
    Row(
        name="bitfit-default",
        config=lambda kind: BitFitConfig(modules_to_save=["head"]),
        kinds=["Linear", "LayerNorm"],
        build=build_with_norms,
    ),
]

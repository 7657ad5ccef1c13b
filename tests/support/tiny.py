"""Tiny models, one per base layer kind, for the contract matrix and property tests."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


class Net(nn.Module):
    """One layer under test followed by a small head (the head exercises modules_to_save)."""

    def __init__(self, layer: nn.Module, example: torch.Tensor) -> None:
        super().__init__()
        self.layer = layer
        with torch.no_grad():
            width = layer(example).flatten(1).shape[1]
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x).flatten(1))


def build(kind: str, seed: int = 0) -> tuple[Net, torch.Tensor]:
    """A fresh model with one layer of ``kind`` and an input batch for it."""
    torch.manual_seed(seed)
    if kind == "Linear":
        layer, x = nn.Linear(6, 5), torch.randn(4, 6)
    elif kind == "Conv1D":  # GPT-2 style, weight stored (in, out)
        layer, x = Conv1D(5, 6), torch.randn(4, 6)
        nn.init.normal_(layer.weight, std=0.3)
    elif kind == "Embedding":
        layer, x = nn.Embedding(20, 6, padding_idx=0), torch.randint(0, 20, (4, 3))
    elif kind == "Conv1d":
        layer, x = nn.Conv1d(3, 4, 3, padding=1), torch.randn(2, 3, 8)
    elif kind == "Conv2d":
        layer, x = nn.Conv2d(3, 4, 3, padding=2, dilation=2), torch.randn(2, 3, 6, 6)
    elif kind == "Conv3d":
        layer, x = nn.Conv3d(2, 3, 2), torch.randn(2, 2, 4, 4, 4)
    else:
        raise ValueError(kind)
    return Net(layer, x), x


def build_with_bias(kind: str, seed: int = 0) -> tuple[Net, torch.Tensor]:
    """:func:`build` with the layer's bias drawn at random (GPT-2's Conv1D starts it at zero), for
    adapters that change the bias: a zero bias would hide a change that does not come undone."""
    model, x = build(kind, seed)
    bias = getattr(model.layer, "bias", None)
    if bias is not None:
        with torch.no_grad():
            bias.normal_(0, 0.5)
    return model, x


KINDS = ["Linear", "Conv1D", "Embedding", "Conv1d", "Conv2d", "Conv3d"]
MATRIX_KINDS = {"Linear", "Conv1D"}  # kinds with a plain weight matrix (SVD / QR inits)


def build_grouped(kind: str, seed: int = 0) -> tuple[Net, torch.Tensor]:
    """A grouped or depthwise convolution (for methods that adapt them) and an input batch for it."""
    torch.manual_seed(seed)
    if kind == "Conv2dGroups":  # 2 groups of 4 input channels
        layer, x = nn.Conv2d(8, 6, 3, padding=1, groups=2), torch.randn(2, 8, 5, 5)
    elif kind == "Conv2dDepthwise":  # one filter per channel, strided
        layer, x = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4), torch.randn(2, 4, 6, 6)
    elif kind == "Conv1dGroups":
        layer, x = nn.Conv1d(6, 6, 3, padding=1, groups=3), torch.randn(2, 6, 7)
    else:
        raise ValueError(kind)
    return Net(layer, x), x


GROUPED_KINDS = ["Conv2dGroups", "Conv2dDepthwise", "Conv1dGroups"]

"""Tiny models holding torch's ``nn.MultiheadAttention``: the module called directly (sequence-first, as the
reference library's custom-model tests use it, or batch-first) and inside ``nn.TransformerEncoder``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

WIDTH, HEADS = 8, 2


class SelfAttention(nn.Module):
    """Self-attention through ``attn`` (an ``nn.MultiheadAttention``), then a small head."""

    def __init__(self, batch_first: bool = False, width: int = WIDTH, kdim: int | None = None) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, HEADS, batch_first=batch_first, kdim=kdim, vdim=kdim)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.attn(x, x, x, need_weights=False)
        return self.head(out)


class Encoder(nn.Module):
    """A two-layer ``nn.TransformerEncoder`` (batch-first) and a head on its first position.

    ``fast=False`` gives the layers an activation torch's fused eval-mode kernel does not take, so they
    always run module by module: outputs compare exactly with the base model's, at any precision.
    """

    def __init__(self, fast: bool = True, nested: bool = False) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            WIDTH, HEADS, 2 * WIDTH, dropout=0.0, batch_first=True, activation="relu" if fast else F.silu
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=nested)
        self.head = nn.Linear(WIDTH, 3)

    def forward(self, x: torch.Tensor, src_key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.encoder(x, src_key_padding_mask=src_key_padding_mask)[:, 0])


def build(kind: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A fresh model of ``kind`` and an input batch for it."""
    torch.manual_seed(seed)
    if kind == "MHA":  # (sequence, batch, width)
        return SelfAttention(), torch.randn(5, 2, WIDTH)
    if kind == "MHABatchFirst":
        return SelfAttention(batch_first=True), torch.randn(2, 5, WIDTH)
    if kind == "TransformerEncoder":
        return Encoder(fast=False), torch.randn(2, 5, WIDTH)
    raise ValueError(kind)


KINDS = ["MHA", "MHABatchFirst", "TransformerEncoder"]

"""The reference library's "MLP" custom model (its tests/test_custom_models.py, same module names and shapes)
and a two-way parity check of one method's case on it, for the method test files (FourierFT, C3A).

Each case runs both ways: "peftkit->peft" (trained by peftkit, saved with ``peftkit.save_adapter``, loaded
with ``peft.PeftModel.from_pretrained``) and "peft->peftkit" (trained by peft, saved with ``save_pretrained``,
loaded with ``peftkit.load_adapter``); the outputs are compared unmerged, merged in place, and merged and
unloaded.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

import peftkit

ATOL = 1e-5
STEPS, LR = 4, 2e-2


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sm(self.lin1(self.drop(self.relu(self.lin0(x)))))


def base() -> MLP:
    torch.manual_seed(0)
    return MLP().eval()


def inputs(seed: int) -> torch.Tensor:
    return torch.randn(9, 10, generator=torch.Generator().manual_seed(seed))


def train(model: nn.Module) -> None:
    """A few AdamW steps pushing the log-probability of class 0 up."""
    torch.manual_seed(2)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    for step in range(STEPS):
        model(inputs(10 + step))[:, 0].mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs(1))


def assert_close(ours: nn.Module, theirs: nn.Module, reference: torch.Tensor, what: str) -> None:
    a, b = out(ours), out(theirs)
    assert (a - reference).abs().max() > 1e-3, f"{what}: the adapter does not change the output"
    assert (a - b).abs().max() <= ATOL, f"{what}: peftkit vs peft max abs diff {(a - b).abs().max():.3e}"


def two_way(direction: str, ours_config: Any, theirs_config: Any, directory: Path) -> None:
    """Train on one side, load on the other, and compare unmerged, merged and merged-and-unloaded."""
    import peft

    reference = out(base())
    torch.manual_seed(0)
    if direction == "peftkit->peft":
        ours = peftkit.inject(base(), ours_config)
        train(ours)
        peftkit.save_adapter(ours, directory)
        theirs = peft.PeftModel.from_pretrained(base(), directory).eval()
    else:
        theirs = peft.get_peft_model(base(), copy.deepcopy(theirs_config))
        train(theirs)
        theirs.save_pretrained(directory)
        ours = peftkit.load_adapter(base(), directory).eval()
    assert_close(ours, theirs, reference, "unmerged")
    peftkit.merge(ours, safe=True)
    theirs.merge_adapter()
    assert_close(ours, theirs, reference, "merged")
    assert_close(
        peftkit.unload(ours, merge=True), theirs.merge_and_unload(), reference, "merged and unloaded"
    )

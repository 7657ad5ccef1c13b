"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv:2402.09353).

The adapted weight is ``m * (W + s*BA) / ||W + s*BA||``: a trainable magnitude ``m`` per output row
times the normalised direction. Following the paper (section 4.3) the norm is detached in the
backward pass, which saves memory and barely changes the gradient.

The math is written once over a 2-D "row view" of the weight that each LoRA layer kind provides
(a Linear weight as is, a GPT-2 Conv1D or an Embedding transposed, a conv kernel flattened per
output channel), so DoRA works on every kind LoRA supports.
"""

from __future__ import annotations

import torch


def row_norm(rows: torch.Tensor) -> torch.Tensor:
    """L2 norm of each row of a 2-D weight view (one magnitude per output channel)."""
    return torch.linalg.norm(rows, dim=1)


def output_scale(magnitude: torch.Tensor, rows: torch.Tensor, lora_rows: torch.Tensor) -> torch.Tensor:
    """``m / ||W + s*BA||`` per row, with the norm detached (DoRA section 4.3)."""
    norm = row_norm(rows + lora_rows.detach()).detach()
    return magnitude.reshape(-1) / norm


def merged_rows(
    magnitude: torch.Tensor, rows: torch.Tensor, lora_rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The merged weight view and the norm it was scaled by (kept to undo the merge exactly)."""
    combined = rows + lora_rows
    norm = row_norm(combined)
    return combined * (magnitude.reshape(-1) / norm).unsqueeze(1), norm


def unmerged_rows(
    magnitude: torch.Tensor, merged: torch.Tensor, lora_rows: torch.Tensor, norm: torch.Tensor
) -> torch.Tensor:
    return merged / (magnitude.reshape(-1) / norm).unsqueeze(1) - lora_rows

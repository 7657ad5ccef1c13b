"""P-tuning (Liu et al. 2021, arXiv:2103.10385): the virtual tokens of prompt tuning, produced by a
prompt encoder (an MLP, or a bidirectional LSTM and an MLP, so that the tokens depend on each other).
Only the encoder's output is saved. The hooks that show the tokens to the model are in ``prompt.py``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..core.registry import register_method
from .prompt import PromptLearningConfig, PromptPart, SoftPromptPart, positive_int

_ENCODERS = ("MLP", "LSTM")


@register_method("P_TUNING")
@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning: virtual tokens produced by a trainable prompt encoder (Liu et al. 2021).

    Attributes:
        encoder_reparameterization_type: ``"MLP"`` (three linear layers with ReLU) or ``"LSTM"`` (a
            bidirectional LSTM, then a two-layer MLP).
        encoder_hidden_size: Hidden width of the encoder; None: ``token_dim``.
        encoder_num_layers: LSTM layers (the MLP always has two hidden layers, as in the reference).
        encoder_dropout: Dropout between LSTM layers.
    """

    pick_when = "you tune soft prompts for understanding tasks and want an encoder (MLP or LSTM) to make their training stabler than prompt tuning's"

    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def problems(self) -> list[str]:
        out = super().problems()
        if self.encoder_reparameterization_type not in _ENCODERS:
            out.append(
                f"encoder_reparameterization_type: one of {', '.join(_ENCODERS)}; got "
                f"{self.encoder_reparameterization_type!r}"
            )
        if not positive_int(self.encoder_num_layers):
            out.append(f"encoder_num_layers: a positive integer; got {self.encoder_num_layers!r}")
        if not isinstance(self.encoder_dropout, (int, float)) or not 0 <= self.encoder_dropout < 1:
            out.append(f"encoder_dropout: must be in [0, 1); got {self.encoder_dropout!r}")
        return out

    def make_part(self, model: nn.Module) -> PromptPart:
        total, dim, hidden = self.num_virtual_tokens, self.token_dim, self.encoder_hidden_size
        encoder = None
        if not self.inference_mode:  # a loaded (inference) adapter is the encoder's saved output alone
            if self.encoder_reparameterization_type == "LSTM":
                encoder = _LstmEncoder(dim, hidden, self.encoder_num_layers, float(self.encoder_dropout))
            else:
                if self.encoder_num_layers != 2:
                    warnings.warn(
                        f"P-tuning's MLP encoder always has 2 hidden layers; encoder_num_layers="
                        f"{self.encoder_num_layers} only applies to the LSTM encoder",
                        stacklevel=3,
                    )
                encoder = nn.Sequential(
                    nn.Linear(dim, hidden),
                    nn.ReLU(),
                    nn.Linear(hidden, hidden),
                    nn.ReLU(),
                    nn.Linear(hidden, dim),
                )
        return SoftPromptPart(nn.Embedding(total, dim), encoder, total)


class _LstmEncoder(nn.Module):
    """P-tuning's LSTM head: a bidirectional LSTM over the virtual tokens, then a two-layer MLP."""

    def __init__(self, dim: int, hidden: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.lstm_head = nn.LSTM(
            dim, hidden, num_layers=layers, dropout=dropout, bidirectional=True, batch_first=True
        )
        width = 2 * hidden  # both directions
        self.mlp_head = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_head(self.lstm_head(x)[0])

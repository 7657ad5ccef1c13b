"""Trainable tokens: rows of an embedding, of a linear layer's outputs, and of a tied embedding / head pair
(the follower on the head shares the embedding's rows), alone and inside LoRA (``trainable_token_indices``)."""

import torch
from torch import nn

import peftkit
from contract_rows import Row
from support.tiny import build

ROWS_OF = {"Embedding": [1, 2, 3, 5, 8, 13], "Linear": [1, 3], "Tied": [1, 2, 3, 5, 8, 13]}


class TiedNet(nn.Module):
    """A tiny language model whose output head holds the embedding's weight (tie_word_embeddings)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 20, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(x))))


def build_tokens(kind: str, seed: int = 0):
    if kind != "Tied":
        return build(kind, seed)
    torch.manual_seed(seed)
    return TiedNet(), torch.randint(0, 20, (4, 5))


def _tokens(kind: str, **options) -> peftkit.TrainableTokensConfig:
    if kind == "Tied":  # the embedding named; the tied head follows it
        return peftkit.TrainableTokensConfig(token_indices=ROWS_OF[kind], target_modules=["embed"], **options)
    return peftkit.TrainableTokensConfig(
        token_indices=ROWS_OF[kind], target_modules=["layer"], modules_to_save=["head"], **options
    )


def _lora(kind: str) -> peftkit.LoraConfig:
    if kind == "Tied":
        return peftkit.LoraConfig(
            r=2, lora_alpha=4, target_modules=["mix"], trainable_token_indices={"embed": ROWS_OF[kind]}
        )
    return peftkit.LoraConfig(
        r=2, lora_alpha=4, target_modules=["head"], trainable_token_indices={"layer": ROWS_OF[kind]}
    )


KINDS = ["Embedding", "Linear", "Tied"]

ROWS = [
    Row(name="trainable-tokens", config=_tokens, kinds=KINDS, build=build_tokens),
    Row(
        name="trainable-tokens-random",
        config=lambda kind: _tokens(kind, init_weights=False),
        kinds=KINDS,
        build=build_tokens,
        starts_at_base=False,
    ),
    Row(name="lora-trainable-tokens", config=_lora, kinds=KINDS, build=build_tokens),
]

"""Tiny models, data and settings shared by the training-loop tests (fit, checkpoints, crashes, distributed)."""

from __future__ import annotations

import random

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

import peftkit
from peftkit.train import (
    TrainConfig,
    seed_everything,
)

VOCAB = 50


def tiny_bert(seed: int = 0, dropout: float = 0.1, lora: bool = True) -> nn.Module:
    """A 2-layer, 32-wide BERT classifier; with LoRA (dropout on) on query/value unless ``lora=False``."""
    seed_everything(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=16,
        num_labels=2,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    model = BertForSequenceClassification(config)
    if lora:
        peftkit.inject(
            model,
            peftkit.make_config(
                "lora", r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["query", "value"]
            ),
        )
    return model


def make_examples(n: int = 37, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(1, VOCAB) for _ in range(8)]
        out.append({"input_ids": ids, "label": int(ids[0] > VOCAB // 2)})
    return out


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.tensor([e["input_ids"] for e in examples]),
        "labels": torch.tensor([e["label"] for e in examples]),
    }


def bert_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch).loss


def make_evaluate(examples: list[dict]):
    def evaluate(model: nn.Module) -> dict[str, float]:
        # draws from the global generators on purpose: fit must keep them away from training
        torch.rand(5)
        random.random()
        batch = collate(examples)
        out = model(**batch)
        accuracy = (out.logits.argmax(-1) == batch["labels"]).float().mean().item()
        return {"loss": out.loss.item(), "accuracy": accuracy}

    return evaluate


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"tensors differ: {different}"


def quiet(**fields) -> TrainConfig:
    return TrainConfig(**{"tensorboard": False, "progress": False, "log_every": 0, **fields})


def no_log(line: str) -> None:
    pass

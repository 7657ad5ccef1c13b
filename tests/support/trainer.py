"""A tiny BERT classifier, records and arguments for the transformers Trainer tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    TrainingArguments,
)

import peftkit

VOCAB = 50


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    """The same base weights whatever ``seed`` is; ``seed`` only changes the adapter's random init."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=16,
        num_labels=2,
    )
    model = BertForSequenceClassification(config)
    torch.manual_seed(seed)
    return peftkit.inject(
        model, peftkit.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["query", "value"])
    )


class Records(torch.utils.data.Dataset):
    def __init__(self, n: int = 24, seed: int = 1) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, 8), generator=generator)
        self.labels = (self.ids[:, 0] > VOCAB // 2).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def arguments(output_dir: Path, **overrides) -> TrainingArguments:
    options = dict(
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=5e-3,
        max_steps=6,
        save_strategy="steps",
        save_steps=3,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return TrainingArguments(output_dir=str(output_dir), **{**options, **overrides})

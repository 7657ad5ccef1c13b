"""The training loop and evaluation helpers, on models small enough to train in a second."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import peftkit
from peftkit.train import evaluate_accuracy, predict, train


def _separable_batches(n_batches: int = 8, size: int = 16) -> list:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n_batches):
        x = torch.randn(size, 4, generator=generator)
        batches.append((x, (x[:, 0] + x[:, 1] > 0).long()))
    return batches


def test_loss_goes_down_on_a_plain_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    batches = _separable_batches()
    losses = train(model, batches, torch.optim.AdamW(model.parameters(), lr=1e-2), steps=40)
    assert len(losses) == 40  # 40 steps over 8 batches: the loop starts the batches over
    assert sum(losses[-8:]) / 8 < 0.5 * sum(losses[:8]) / 8
    assert evaluate_accuracy(model, batches) > 0.9


def test_epochs_count_passes_and_the_scheduler_steps_every_step():
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
    losses = train(model, _separable_batches(3), optimizer, epochs=2, scheduler=scheduler, max_grad_norm=None)
    assert len(losses) == 6
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1 / 7)


def test_progress_lines_go_to_log():
    model = nn.Linear(4, 2)
    lines: list[str] = []
    train(
        model,
        _separable_batches(4),
        torch.optim.SGD(model.parameters(), lr=0.1),
        steps=4,
        log_every=2,
        log=lines.append,
    )
    assert len(lines) == 2 and lines[1].startswith("step     4/4")


def test_empty_batches_are_an_error():
    model = nn.Linear(4, 2)
    with pytest.raises(ValueError, match="no batch"):
        train(model, [], torch.optim.SGD(model.parameters(), lr=0.1), steps=3)
    with pytest.raises(ValueError, match="no batch"):
        evaluate_accuracy(model, [])


class FixedLogits(nn.Module):
    """Returns the logits it is given as ``inputs["logits"]``, wrapped like a transformers output."""

    def __init__(self) -> None:
        super().__init__()
        self.seen_training: list[bool] = []

    def forward(self, logits: torch.Tensor) -> SimpleNamespace:
        self.seen_training.append(self.training)
        return SimpleNamespace(logits=logits)


def test_evaluate_accuracy_on_a_hand_made_case():
    model = FixedLogits().train()
    batches = [
        ({"logits": torch.tensor([[2.0, 1.0], [0.0, 3.0]])}, torch.tensor([0, 1])),  # both right
        ({"logits": torch.tensor([[1.0, 0.0], [5.0, -1.0]])}, torch.tensor([0, 1])),  # second wrong
    ]
    assert evaluate_accuracy(model, batches) == 0.75
    assert model.seen_training == [False, False] and model.training  # eval mode inside, restored after
    logits, targets = predict(model, batches)
    assert logits.shape == (4, 2) and targets.tolist() == [0, 1, 0, 1]


def test_trains_a_lora_adapter_on_a_tiny_transformer():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        num_labels=2,
    )
    model = peftkit.inject(
        BertForSequenceClassification(config), peftkit.LoraConfig(r=4, target_modules=["query", "value"])
    )
    ids = torch.randint(3, 50, (64, 8))
    labels = (ids == 7).any(dim=1).long()  # "does token 7 occur?"
    batches = [({"input_ids": ids[i : i + 16]}, labels[i : i + 16]) for i in range(0, 64, 16)]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    losses = train(model, batches, torch.optim.AdamW(trainable, lr=1e-2), steps=40)
    assert sum(losses[-4:]) < sum(losses[:4])
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)

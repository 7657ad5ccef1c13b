"""Training: one explicit loop any ``nn.Module`` can use, and evaluation helpers."""

from .loop import evaluate_accuracy, logits_of, predict, train

__all__ = ["evaluate_accuracy", "logits_of", "predict", "train"]

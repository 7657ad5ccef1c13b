"""Training: one explicit loop any ``nn.Module`` can use (:func:`fit`), and evaluation helpers.

:func:`fit` is the full loop (AdamW / LoRA+, schedules, accumulation, bf16, gradient checkpointing,
evaluation, early stopping, atomic resumable checkpoints). :func:`train` is the minimal loop over
ready-made ``(inputs, targets)`` batches that the demo uses.
"""

from .checkpoint import load_weights, seed_everything
from .config import TrainConfig
from .fit import FitResult, fit
from .loop import evaluate_accuracy, logits_of, predict, train
from .optim import make_optimizer, param_groups
from .runtime import resolve_device, train_config_problems
from .schedule import lr_multiplier, make_scheduler

__all__ = [
    "FitResult",
    "TrainConfig",
    "evaluate_accuracy",
    "fit",
    "load_weights",
    "logits_of",
    "lr_multiplier",
    "make_optimizer",
    "make_scheduler",
    "param_groups",
    "predict",
    "resolve_device",
    "seed_everything",
    "train",
    "train_config_problems",
]

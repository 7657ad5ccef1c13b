"""Typed settings of the training loop (the ``train:`` section of a run config)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

# The names train.report_to knows (peftkit.train.experiment_logging has a logger for each but jsonl,
# the tracker's own file). A list of str, not of a Literal, so that an unknown name gets the message of
# train_config_problems, which lists these.
REPORT_TO = ("tensorboard", "wandb", "mlflow", "jsonl")
# metric names (or their ends: "eval_loss", "val_perplexity") for which smaller is better
LOWER_IS_BETTER = ("loss", "perplexity", "ppl", "wer", "cer", "error")


def lower_is_better(metric: str) -> bool:
    """Whether a smaller ``metric`` is better: losses, perplexities and error rates."""
    return metric.lower().endswith(LOWER_IS_BETTER)


@dataclass
class TrainConfig:
    """How :func:`peftkit.train.fit` trains.

    Attributes:
        steps: Optimizer steps; ``None`` runs ``epochs`` full passes over the training split.
        epochs: Passes over the training split when ``steps`` is None.
        batch_size: Examples per forward pass.
        grad_accum: Forward passes accumulated per optimizer step (effective batch = batch_size x grad_accum).
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay (never applied to biases and norm parameters).
        lora_plus_ratio: LoRA+ (arXiv:2402.12354): B matrices learn this many times faster than A;
            None = plain AdamW. Only for LoRA-family adapters.
        optimizer: "adamw" (the default), or an optimizer a method registers: "lora_fa" trains LoRA
            adapters with A frozen and B's gradient projected (LoRA-FA, docs/lora_fa.md). Not with
            ``lora_plus_ratio``.
        schedule: "linear", "cosine" or "constant" after warm-up.
        warmup_steps: Linear warm-up steps; ``warmup_ratio`` is used when this is None.
        warmup_ratio: Warm-up as a fraction of all optimizer steps.
        max_grad_norm: Clip the gradient norm to this (None: no clipping).
        on_nonfinite: What a step whose loss or gradient norm is NaN or inf does: "stop" the run
            (status "diverged") before applying it, or "skip" its optimizer step and go on; after
            ``fit.MAX_SKIPS_IN_A_ROW`` (10) skipped steps in a row the next one stops the run anyway.
        precision: "auto" (the default): bf16 autocast where the device computes bf16 natively (a CUDA
            GPU with bf16, a CPU with AMX or AVX-512 BF16), fp32 elsewhere; "fp32"; or "bf16"
            (autocast on CPU and GPU; weights, adapters and optimizer state stay in their dtype).
        gradient_checkpointing: Recompute activations in the backward pass (saves memory).
        eval_every: Evaluate on the validation split every this many optimizer steps (0: only at the end).
        metric: The validation metric that picks the best checkpoint and drives early stopping.
        greater_is_better: Whether a larger ``metric`` is better; None (the default) decides from the
            metric: smaller is better for a loss or perplexity, larger for anything else (``maximize``).
        early_stopping_patience: Stop after this many evaluations without improvement (None: never).
        save_every: Write a resumable checkpoint every this many optimizer steps (0: only at evaluations and the end).
        log_every: Log training loss, learning rate and throughput every this many optimizer steps.
        seed: Seeds the data order, dropout and any initialisation done by the run.
        device: "auto" (GPU when available), "cpu", "cuda", "cuda:1" ...
        distributed: With several processes (torchrun): "ddp" replicates the model on every process
            (DistributedDataParallel); "fsdp" shards the frozen base model's parameters over the
            processes (FSDP2 ``fully_shard``) and replicates the trainable adapter. Ignored in one process.
        tensorboard: Also write TensorBoard event files (needs the ``tensorboard`` package); read only
            when ``report_to`` is None.
        report_to: Where metrics go: any of "tensorboard", "wandb", "mlflow", "jsonl". None: "jsonl",
            plus "tensorboard" when ``tensorboard`` is true (the behaviour before this field existed).
            ``metrics.jsonl`` is written in every case (the run's own record; "jsonl" may be listed to
            say so). See docs/training.md, "Experiment logging".
        progress: Show a progress bar (loss, throughput, time left) on a terminal.
    """

    steps: int | None = None
    epochs: int = 1
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    lora_plus_ratio: float | None = None
    optimizer: str = "adamw"
    schedule: str = "linear"
    warmup_steps: int | None = None
    warmup_ratio: float = 0.06
    max_grad_norm: float | None = 1.0
    on_nonfinite: Literal["stop", "skip"] = "stop"
    precision: str = "auto"
    gradient_checkpointing: bool = False
    eval_every: int = 0
    metric: str = "loss"
    greater_is_better: bool | None = None
    early_stopping_patience: int | None = None
    save_every: int = 0
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    distributed: Literal["ddp", "fsdp"] = "ddp"
    tensorboard: bool = True
    report_to: list[str] | None = None
    progress: bool = True

    @property
    def maximize(self) -> bool:
        """Whether a larger ``metric`` is better: ``greater_is_better`` when set, else every metric but a
        loss or perplexity (what a user who did not say means)."""
        if self.greater_is_better is not None:
            return self.greater_is_better
        return not lower_is_better(self.metric)


# -- the section's rules, as a run config's train: section reports them ---------------------------------

_Check = tuple[str, Callable[[Any], bool], str]
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")

# (field, predicate on the value, what is expected) for the train section; the dataclass keeps no
# validation of its own (it is a plain typed record shared by the library and the CLI).
_TRAIN_CHECKS: list[_Check] = [
    (
        "steps",
        lambda v: v is None or v > 0,
        "a positive number of optimizer steps, or null to run train.epochs",
    ),
    ("epochs", lambda v: v > 0, "a positive number of passes"),
    ("batch_size", lambda v: v > 0, "a positive number of examples"),
    ("grad_accum", lambda v: v > 0, "a positive number of forward passes per step"),
    ("lr", lambda v: 0 < v < float("inf"), "a positive learning rate, e.g. 2e-4"),
    ("weight_decay", lambda v: v >= 0, "a non-negative number"),
    (
        "lora_plus_ratio",
        lambda v: v is None or v > 0,
        "a positive ratio (16 in the LoRA+ paper), or null",
    ),
    (
        "optimizer",
        lambda v: isinstance(v, str) and v != "",
        "adamw, or an optimizer a method registers (lora_fa)",
    ),
    ("schedule", lambda v: v in ("linear", "cosine", "constant"), "one of linear, cosine, constant"),
    (
        "warmup_steps",
        lambda v: v is None or v >= 0,
        "a non-negative number of steps, or null to use warmup_ratio",
    ),
    ("warmup_ratio", lambda v: 0 <= v < 1, "a fraction in [0, 1)"),
    ("max_grad_norm", lambda v: v is None or v > 0, "a positive norm, or null for no clipping"),
    ("precision", lambda v: v in ("auto", "fp32", "bf16"), "auto, fp32 or bf16"),
    ("eval_every", lambda v: v >= 0, "a non-negative number of steps (0: only at the end)"),
    ("metric", lambda v: bool(v), "a metric name such as loss or accuracy"),
    (
        "early_stopping_patience",
        lambda v: v is None or v > 0,
        "a positive number of evaluations, or null",
    ),
    ("save_every", lambda v: v >= 0, "a non-negative number of steps (0: at evaluations and the end)"),
    ("log_every", lambda v: v >= 0, "a non-negative number of steps"),
    ("device", lambda v: _DEVICE.fullmatch(v) is not None, "auto, cpu, cuda, cuda:N or mps"),
    (
        "report_to",
        lambda v: v is None or set(v) <= set(REPORT_TO),
        f"a list of {', '.join(REPORT_TO)}, or null",
    ),
]


def train_problems(train: TrainConfig) -> list[str]:
    """Every problem of a run config's ``train:`` values, each headed by its field path."""
    problems = [
        f"train.{name}: expected {expected}, got {getattr(train, name)!r}"
        for name, ok, expected in _TRAIN_CHECKS
        if not ok(getattr(train, name))
    ]
    if lower_is_better(train.metric) and train.greater_is_better is True:
        problems.append(f"train.greater_is_better: a lower {train.metric} is better; set it to false")
    return problems

"""What surrounds the loop of :func:`peftkit.train.fit`: settings checks, the device, gradient
checkpointing and Ctrl-C handling."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator, Mapping
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ..core import registry
from ..errors import ConfigError
from .config import REPORT_TO, TrainConfig
from .schedule import SCHEDULES

PRECISIONS = ("auto", "fp32", "bf16")
# What train.precision "auto" resolves to on this machine, when set (fp32 or bf16): a fleet of mixed
# machines, or a test suite, that must compute alike everywhere pins it here instead of in every config.
AUTO_PRECISION_ENV = "PEFTKIT_AUTO_PRECISION"
DISTRIBUTED = ("ddp", "fsdp")


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak memory allocated since the last reset; CPU: the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors of ``batch`` (nested in mappings, lists, tuples) on ``device``; other values as they are."""
    if device.type == "cpu":
        return batch  # collate builds CPU tensors; keep the batch's own type (e.g. BatchEncoding)
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return (
            batch.to(device)
            if callable(getattr(batch, "to", None))
            else {k: to_device(v, device) for k, v in batch.items()}
        )
    if isinstance(batch, list | tuple):
        moved = [to_device(v, device) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)  # namedtuples too
    return batch


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; other names as ``torch.device`` reads them.

    Raises:
        ConfigError: a CUDA device was asked for and none is available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            [f"train.device is {name!r} but no CUDA GPU is available: use 'auto' or 'cpu'"],
            what="training setup",
        )
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware: a CUDA GPU with bf16 support, or a
    CPU with AMX or AVX-512 BF16 (where a training step under bf16 autocast measured 0.6-0.7x the fp32
    one, docs/performance.md "bf16 on CPU"). Elsewhere bf16 is emulated and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        # private but long-standing torch.cpu probes; a torch without them reads as "no", i.e. fp32
        probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``train.precision`` as a run uses it: "fp32" or "bf16". "auto" is bf16 autocast where the device
    computes bf16 natively (:func:`native_bf16`) and fp32 elsewhere, unless ``$PEFTKIT_AUTO_PRECISION``
    pins it.

    Raises:
        ConfigError: ``$PEFTKIT_AUTO_PRECISION`` holds something other than fp32 or bf16.
    """
    if precision != "auto":
        return precision
    pinned = os.environ.get(AUTO_PRECISION_ENV, "").strip()
    if pinned:
        if pinned not in ("fp32", "bf16"):
            raise ConfigError(
                [f"${AUTO_PRECISION_ENV} is {pinned!r}: set it to fp32 or bf16, or unset it to detect"],
                what="training setup",
            )
        return pinned
    return "bf16" if native_bf16(device) else "fp32"


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def train_config_problems(config: TrainConfig) -> list[str]:
    """Every problem of ``config`` as ``"train.<field>: ..."`` lines (empty when valid)."""
    checks = [
        ("steps", config.steps is None or _is_int(config.steps, 1), "a positive integer or null"),
        ("epochs", _is_int(config.epochs, 1), "a positive integer"),
        ("batch_size", _is_int(config.batch_size, 1), "a positive integer"),
        ("grad_accum", _is_int(config.grad_accum, 1), "a positive integer"),
        ("lr", isinstance(config.lr, int | float) and config.lr > 0, "a positive number"),
        (
            "weight_decay",
            isinstance(config.weight_decay, int | float) and config.weight_decay >= 0,
            "a number >= 0",
        ),
        (
            "lora_plus_ratio",
            config.lora_plus_ratio is None
            or (isinstance(config.lora_plus_ratio, int | float) and config.lora_plus_ratio > 0),
            "a positive number or null",
        ),
        (
            "optimizer",
            config.optimizer in registry.registered_optimizers(),
            f"one of {', '.join(registry.registered_optimizers())}",
        ),
        ("schedule", config.schedule in SCHEDULES, f"one of {', '.join(SCHEDULES)}"),
        (
            "warmup_steps",
            config.warmup_steps is None or _is_int(config.warmup_steps, 0),
            "an integer >= 0 or null",
        ),
        (
            "warmup_ratio",
            isinstance(config.warmup_ratio, int | float) and 0 <= config.warmup_ratio < 1,
            "in [0, 1)",
        ),
        (
            "max_grad_norm",
            config.max_grad_norm is None
            or (isinstance(config.max_grad_norm, int | float) and config.max_grad_norm > 0),
            "a positive number or null",
        ),
        ("precision", config.precision in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
        ("eval_every", _is_int(config.eval_every, 0), "an integer >= 0"),
        (
            "early_stopping_patience",
            config.early_stopping_patience is None or _is_int(config.early_stopping_patience, 1),
            "a positive integer or null",
        ),
        ("save_every", _is_int(config.save_every, 0), "an integer >= 0"),
        ("log_every", _is_int(config.log_every, 0), "an integer >= 0"),
        ("seed", _is_int(config.seed, 0), "an integer >= 0"),
        ("metric", isinstance(config.metric, str) and config.metric != "", "a metric name"),
        ("distributed", config.distributed in DISTRIBUTED, f"one of {', '.join(DISTRIBUTED)}"),
    ]
    problems = [
        f"train.{name}: expected {expected}, got {getattr(config, name)!r}"
        for name, ok, expected in checks
        if not ok
    ]
    if config.device != "auto":
        try:
            torch.device(config.device)
        except (RuntimeError, TypeError):
            problems.append(
                f"train.device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {config.device!r}"
            )
    if config.optimizer != registry.DEFAULT_OPTIMIZER and config.lora_plus_ratio is not None:
        problems.append(
            f"train.lora_plus_ratio: sets AdamW's groups, and train.optimizer {config.optimizer!r} builds its "
            "own; set lora_plus_ratio to null or optimizer to adamw"
        )
    return problems + _report_to_problems(config)


def _report_to_problems(config: TrainConfig) -> list[str]:
    names, known = config.report_to, REPORT_TO
    if names is None:
        return []
    if not isinstance(names, list | tuple) or not all(isinstance(name, str) for name in names):
        return [f"train.report_to: expected a list of names from {', '.join(known)} (or null), got {names!r}"]
    unknown = [name for name in names if name not in known]
    if unknown:
        return [
            f"train.report_to: unknown {', '.join(map(repr, unknown))}; known: {', '.join(known)} "
            "(or null: jsonl, plus tensorboard when train.tensorboard is true)"
        ]
    if not config.tensorboard and "tensorboard" in names:
        return [
            "train.report_to lists tensorboard but train.tensorboard is false: drop one of the two "
            "(when report_to is set, it alone decides)"
        ]
    return []


@contextlib.contextmanager
def gradient_checkpointing(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Turn on transformers' activation checkpointing for the run (non-reentrant), then off again.

    The non-reentrant implementation matters with frozen embeddings: the reentrant one only
    back-propagates through a checkpointed block when one of its *inputs* requires grad, and the
    hidden states coming out of a frozen embedding do not, so every adapter inside would get no
    gradient. Non-reentrant checkpointing follows the parameters, and restores the RNG state when it
    recomputes, so dropout masks (and gradients) are those of a run without checkpointing.
    """
    owner = next((m for m in model.modules() if hasattr(m, "gradient_checkpointing_enable")), None)
    if not enabled or (
        owner is not None
        and any(getattr(m, "gradient_checkpointing", False) is True for m in owner.modules())
    ):
        yield  # off, or already on by the caller's choice: leave it as it is
        return
    if owner is None:
        raise ConfigError(
            [
                f"train.gradient_checkpointing needs a transformers model; {type(model).__name__} has no "
                "gradient_checkpointing_enable(). For your own module, wrap its blocks in "
                "torch.utils.checkpoint.checkpoint(..., use_reentrant=False) or turn the setting off"
            ],
            what="training setup",
        )
    had_input_hooks = bool(getattr(owner, "_require_grads_hooks", None)) or hasattr(
        owner, "_require_grads_hook"
    )
    kwargs = {"use_reentrant": False}
    try:
        if hasattr(owner, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed it
            owner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            owner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    except ValueError as exc:
        raise ConfigError(
            [f"train.gradient_checkpointing: {exc}; turn the setting off for this model"],
            what="training setup",
        ) from exc
    try:
        yield
    finally:
        if hasattr(owner, "activation_checkpointing_disable"):
            owner.activation_checkpointing_disable()
        else:
            owner.gradient_checkpointing_disable()
        if not had_input_hooks and hasattr(owner, "disable_input_require_grads"):
            owner.disable_input_require_grads()  # transformers adds these hooks; leave the model as it came


@contextlib.contextmanager
def interrupt_flag() -> Iterator[SimpleNamespace]:
    """Turn the first Ctrl-C into a request to stop after the current step (main thread only)."""
    flag = SimpleNamespace(requested=False)
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.getsignal(signal.SIGINT)
    previous = previous if previous is not None else signal.default_int_handler

    def request_stop(signum: int, frame: Any) -> None:
        flag.requested = True
        signal.signal(signal.SIGINT, previous)  # a second Ctrl-C aborts at once
        sys.stderr.write(
            "\nCtrl-C: stopping after this step and writing a checkpoint (press again to abort now)\n"
        )

    signal.signal(signal.SIGINT, request_stop)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)

"""Rows of the contract matrix: one module per method, each defining ``ROWS`` (STYLE.md rule 10).

A new method adds ``tests/contract_rows/<method>.py``; :func:`all_rows` finds it, so the matrix
itself never changes. A row says how to build the method's config for a tiny model and which
properties the method has; ``test_contract.py`` checks the same invariants for every row.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from support.tiny import KINDS, build

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def call(model: nn.Module, x) -> torch.Tensor:
    """The model's output as one tensor (tiny nets return a tensor; transformers return logits)."""
    out = model(**x) if isinstance(x, dict) else model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


@dataclass
class Row:
    """One method variant in the contract matrix.

    Attributes:
        name: The test id, e.g. ``"lora-dora-pissa"``.
        config: Builds the config for a model from ``build``; it must target the module named
            ``"layer"`` and save ``"head"`` in full when ``build`` is the tiny nets of ``_tiny.py``.
        kinds: The ``_tiny.py`` kinds (or the row's own) the method supports.
        mergeable: Whether merge() works; if not it must raise a clear error and change nothing.
        rewrites_base: The init moves part of the base weight into the adapter (PiSSA/OLoRA): the
            disabled model is the residual, and unload gives the original back within rounding.
        starts_at_base: A fresh adapter leaves the output unchanged.
        build: ``(kind) -> (model, input)``; defaults to the tiny one-layer nets.
        dtypes: The dtypes to test.
        tol: Allowed fp32 difference for merged vs unmerged outputs.
        lr: Learning rate for the few training steps (big enough to move every adapter tensor).
        optimizer: ``(model, lr) -> optimizer`` for those steps when the method trains through its own
            (LoRA-FA's, which also freezes A); None: AdamW over the trainable parameters.
    """

    name: str
    config: Callable[[str], object]
    kinds: list[str] = field(default_factory=lambda: list(KINDS))
    mergeable: bool = True
    rewrites_base: bool = False
    starts_at_base: bool = True
    build: Callable[[str], tuple[nn.Module, object]] = build
    dtypes: list[str] = field(default_factory=lambda: list(DTYPES))
    tol: float = 1e-5
    lr: float = 5e-2
    optimizer: Callable[[nn.Module, float], torch.optim.Optimizer] | None = None


def all_rows() -> list[Row]:
    rows: list[Row] = []
    for info in pkgutil.iter_modules(__path__):
        rows += importlib.import_module(f"{__name__}.{info.name}").ROWS
    return rows

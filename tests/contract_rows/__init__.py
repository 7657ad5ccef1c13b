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

import peftkit
from support.tiny import KINDS, build

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def call(model: nn.Module, x) -> torch.Tensor:
    """The model's output as one tensor (tiny nets return a tensor; transformers return logits)."""
    out = model(**x) if isinstance(x, dict) else model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def inject_with_data(model: nn.Module, config, x) -> None:
    """Inject ``config`` as a run does, through the config's data hooks, with ``x`` as the data: a train
    step (forward and backward of a squared-output loss on ``x``) for ``init_from_data`` when
    ``needs_init_data()``, then ``inject_from_data`` on the one batch ``x`` when ``needs_data()``,
    else ``peftkit.inject``."""
    if config.needs_init_data():

        def train_step() -> None:
            call(model, x).float().pow(2).mean().backward()

        config.init_from_data(model, train_step)
    if config.needs_data():
        config.inject_from_data(model, [x], call)
    else:
        peftkit.inject(model, config)


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
        unload_restores: Whether unload gives the original weights back. False where the init replaced
            the base for good (with ``rewrites_base``): the disabled and the unloaded model are then both
            that new base, exactly.
        starts_at_base: A fresh adapter leaves the output unchanged.
        build: ``(kind) -> (model, input)``; defaults to the tiny one-layer nets.
        dtypes: The dtypes to test.
        tol: Allowed fp32 difference for merged vs unmerged outputs.
        save_portable: Save with ``portable=True`` (relative to the original weights, which the test
            loads into): for an init whose plain save belongs on the base it rewrote and cannot be redone
            from the file.
        load_tol: Allowed fp32 difference between the loaded and the saved model's outputs; 0: they
            are bit-identical. A portable save (``save_portable``, or one the config always makes) is the
            original base plus a rank-2r adapter: the same function summed another way.
        lr: Learning rate for the few training steps (big enough to move every adapter tensor).
        optimizer: ``(model, lr) -> optimizer`` for those steps when the method trains through its own
            (LoRA-FA's, which also freezes A); None: AdamW over the trainable parameters.
        inject: ``(model, config, input) -> None`` when the adapter does not start with
            ``peftkit.inject(model, config)``: :func:`inject_with_data` for inits that start from data
            (the example input as the data); None: ``peftkit.inject``.
    """

    name: str
    config: Callable[[str], object]
    kinds: list[str] = field(default_factory=lambda: list(KINDS))
    mergeable: bool = True
    rewrites_base: bool = False
    unload_restores: bool = True
    starts_at_base: bool = True
    build: Callable[[str], tuple[nn.Module, object]] = build
    dtypes: list[str] = field(default_factory=lambda: list(DTYPES))
    tol: float = 1e-5
    save_portable: bool = False
    load_tol: float = 0.0
    lr: float = 5e-2
    optimizer: Callable[[nn.Module, float], torch.optim.Optimizer] | None = None
    inject: Callable[[nn.Module, object, object], None] | None = None


def all_rows() -> list[Row]:
    rows: list[Row] = []
    for info in pkgutil.iter_modules(__path__):
        rows += importlib.import_module(f"{__name__}.{info.name}").ROWS
    return rows

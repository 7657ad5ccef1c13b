"""Time several set-ups of one step in one process, interleaved, so the machine's drift hits all alike.

Used by the single-question benchmarks (``base_dropout``, ``precision``): each set-up gets one
full-size warm-up step (timed and reported as the first step), then ``rounds`` rounds in which every
set-up takes one step, the order rotating per round.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def time_interleaved(
    steps: dict[str, Callable[[], None]], rounds: int
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """``(first step, samples)`` per set-up name, in seconds."""

    def timed(name: str) -> float:
        start = time.perf_counter()
        steps[name]()
        return time.perf_counter() - start

    names = list(steps)
    first = {name: timed(name) for name in names}
    samples: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(timed(name))
    return first, samples


def medians(samples: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in samples.items()}


def training_step(net: Any, batch: dict[str, Any], lr: float, bf16: bool = False) -> Callable[[], None]:
    """One forward + backward + AdamW step of ``net`` on ``batch`` (optionally under bf16 autocast), as a
    callable for :func:`time_interleaved`; the optimizer is built here, over the trainable parameters."""
    import torch

    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = net(**batch).loss
        loss.float().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def add_arguments(parser: argparse.ArgumentParser, case: str, rounds: int = 6) -> None:
    """The options every single-question timing takes: the case, rounds, threads, weights, a JSON file."""
    from benchmarks import cases

    parser.add_argument("--case", default=case, help="a training case (python -m benchmarks.run --list)")
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--weights", default="real", choices=cases.WEIGHTS)
    parser.add_argument("--json", type=Path, default=None)

"""Time several set-ups of one step in one process, interleaved, so the machine's drift hits all alike.

Used by the single-question benchmarks (``base_dropout``, ``precision``): each set-up gets one
full-size warm-up step (timed and reported as the first step), then ``rounds`` rounds in which every
set-up takes one step, the order rotating per round.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


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

"""Which examples each optimizer step sees: a pure function of (seed, epoch, step).

Every epoch is one seeded permutation of the training examples cut into micro-batches of
``batch_size`` (the last one of an epoch may be smaller). Micro-batches form one stream across
epochs, and optimizer step ``s`` (0-based) takes micro-batches ``s * grad_accum`` to
``(s + 1) * grad_accum - 1`` of that stream, so a step may straddle two epochs. Because nothing here
depends on what ran before, a resumed run needs only the step number to continue with exactly the
examples an uninterrupted run would have used; the checkpoint records the epoch and the position in
that epoch's permutation as well, for people and for a consistency check.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    """The order of examples ``0 .. n-1`` in ``epoch``; identical on every machine and Python run.

    ``random.Random`` seeded with a string hashes it with SHA-512, which is stable across processes
    (unlike ``hash()``) and platforms.
    """
    order = list(range(n))
    random.Random(f"peftkit-data-order:{seed}:{epoch}").shuffle(order)
    return order


@dataclass
class DataPlan:
    """The micro-batches of a run.

    Attributes:
        n: Training examples.
        batch_size: Examples per micro-batch (forward pass).
        grad_accum: Micro-batches per optimizer step.
        seed: Seeds every epoch's permutation.
        total_micro_batches: Micro-batches in the whole run.
    """

    n: int
    batch_size: int
    grad_accum: int
    seed: int
    total_micro_batches: int
    _cache: dict[int, list[int]] = field(default_factory=dict, repr=False)

    @classmethod
    def for_run(cls, n: int, batch_size: int, grad_accum: int, seed: int, steps: int | None, epochs: int) -> DataPlan:
        """A plan of ``steps`` optimizer steps, or of ``epochs`` full passes when ``steps`` is None."""
        per_epoch = math.ceil(n / batch_size)
        total = steps * grad_accum if steps is not None else epochs * per_epoch
        return cls(n, batch_size, grad_accum, seed, total)

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.n / self.batch_size)

    @property
    def total_steps(self) -> int:
        return math.ceil(self.total_micro_batches / self.grad_accum)

    def permutation(self, epoch: int) -> list[int]:
        if epoch not in self._cache:
            self._cache.clear()  # one epoch at a time: a step straddles at most two epochs
            self._cache[epoch] = epoch_permutation(self.n, self.seed, epoch)
        return self._cache[epoch]

    def step_batches(self, step: int) -> list[list[int]]:
        """Example indices of each micro-batch of optimizer step ``step`` (0-based)."""
        first = step * self.grad_accum
        last = min(first + self.grad_accum, self.total_micro_batches)
        out = []
        for micro in range(first, last):
            epoch, batch = divmod(micro, self.batches_per_epoch)
            order = self.permutation(epoch)
            out.append(order[batch * self.batch_size:(batch + 1) * self.batch_size])
        return out

    def position_after(self, steps_done: int) -> dict[str, int]:
        """Where the data stream stands after ``steps_done`` optimizer steps.

        ``epoch`` and ``batch`` name the next micro-batch; ``example`` is its first example's index in
        that epoch's permutation.
        """
        micro = min(steps_done * self.grad_accum, self.total_micro_batches)
        epoch, batch = divmod(micro, self.batches_per_epoch)
        return {"epoch": epoch, "batch": batch, "example": batch * self.batch_size}

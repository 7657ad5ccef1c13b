"""Which examples each optimizer step sees: a pure function of (seed, epoch, step).

Every epoch is one seeded permutation of the training examples cut into micro-batches of
``batch_size`` (the last one of an epoch may be smaller). Micro-batches form one stream across
epochs, and optimizer step ``s`` (0-based) takes micro-batches ``s * grad_accum`` to
``(s + 1) * grad_accum - 1`` of that stream, so a step may straddle two epochs. Because nothing here
depends on what ran before, a resumed run needs only the step number to continue with exactly the
examples an uninterrupted run would have used; the checkpoint records the epoch and the position in
that epoch's permutation as well, for people and for a consistency check.

With several processes (``world_size`` > 1) a micro-batch is global: ``batch_size`` examples per
process, ``batch_size x world_size`` in all, cut from the same permutation, and process ``rank`` takes
its contiguous share (:func:`shard`). So 2 processes with batch b see exactly the examples of one
process with batch 2b, in the same order, and the plan stays a pure function of (seed, epoch, step).
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


def shard(indices: list[int], rank: int, world_size: int) -> list[int]:
    """Process ``rank``'s contiguous share of one global micro-batch.

    Shares differ in size by at most one example, so a smaller last batch of an epoch is spread
    evenly; a share is empty only when the batch has fewer examples than there are processes.
    """
    m = len(indices)
    return indices[m * rank // world_size : m * (rank + 1) // world_size]


@dataclass
class DataPlan:
    """The micro-batches of a run.

    Attributes:
        n: Training examples.
        batch_size: Examples per micro-batch (forward pass) of each process.
        grad_accum: Micro-batches per optimizer step.
        seed: Seeds every epoch's permutation.
        total_micro_batches: Micro-batches in the whole run.
        world_size: Processes sharing each micro-batch (1 without torch.distributed).
    """

    n: int
    batch_size: int
    grad_accum: int
    seed: int
    total_micro_batches: int
    world_size: int = 1
    _cache: dict[int, list[int]] = field(default_factory=dict, repr=False)

    @classmethod
    def for_run(
        cls,
        n: int,
        batch_size: int,
        grad_accum: int,
        seed: int,
        steps: int | None,
        epochs: int,
        world_size: int = 1,
    ) -> DataPlan:
        """A plan of ``steps`` optimizer steps, or of ``epochs`` full passes when ``steps`` is None."""
        per_epoch = math.ceil(n / (batch_size * world_size))
        total = steps * grad_accum if steps is not None else epochs * per_epoch
        return cls(n, batch_size, grad_accum, seed, total, world_size)

    @property
    def global_batch_size(self) -> int:
        """Examples per micro-batch over all processes."""
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.n / self.global_batch_size)

    @property
    def total_steps(self) -> int:
        return math.ceil(self.total_micro_batches / self.grad_accum)

    def permutation(self, epoch: int) -> list[int]:
        if epoch not in self._cache:
            self._cache.clear()  # one epoch at a time: a step straddles at most two epochs
            self._cache[epoch] = epoch_permutation(self.n, self.seed, epoch)
        return self._cache[epoch]

    def step_batches(self, step: int) -> list[list[int]]:
        """Example indices of each (global) micro-batch of optimizer step ``step`` (0-based)."""
        first = step * self.grad_accum
        last = min(first + self.grad_accum, self.total_micro_batches)
        size = self.global_batch_size
        out = []
        for micro in range(first, last):
            epoch, batch = divmod(micro, self.batches_per_epoch)
            order = self.permutation(epoch)
            out.append(order[batch * size : (batch + 1) * size])
        return out

    def rank_batches(self, step: int, rank: int) -> list[list[int]]:
        """Process ``rank``'s share of each micro-batch of step ``step`` (:func:`shard`)."""
        return [shard(indices, rank, self.world_size) for indices in self.step_batches(step)]

    def position_after(self, steps_done: int) -> dict[str, int]:
        """Where the data stream stands after ``steps_done`` optimizer steps.

        ``epoch`` and ``batch`` name the next micro-batch; ``example`` is its first example's index in
        that epoch's permutation.
        """
        micro = min(steps_done * self.grad_accum, self.total_micro_batches)
        epoch, batch = divmod(micro, self.batches_per_epoch)
        return {"epoch": epoch, "batch": batch, "example": batch * self.global_batch_size}

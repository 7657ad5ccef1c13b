"""Spend a parameter budget on candidates: which modules get a LoRA adapter, at what rank, and which
whole parameters train in full.

Every score (``scores.py``) gives a low-rank candidate one *gain per rank*: what its k-th rank adds
(e.g. the k-th squared singular value of the module's gradient), non-increasing in k, and a whole
parameter one gain. Maximising the total gain under the budget is a knapsack problem; with
non-increasing gains per rank each rank is an item whose value per parameter only falls, so the
greedy rule (take the item with the highest gain per parameter that still fits, skip those that do not)
is the classic near-optimal approximation, and optimal whenever the budget ends on an item boundary.

Ties go to the lower rank, then to the earlier module in the model, so the same scores give the same answer.
Items with zero gain are never bought: spending parameters where the probe saw no signal only adds noise,
so a budget can be left partly unused (the report says how much).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .candidates import LowRank, WholeParams


@dataclass
class Allocation:
    """The choice: ``ranks`` (module -> LoRA rank), ``whole`` (whole-parameter candidates, by name, in the
    order chosen), the parameters ``used`` of ``budget``, and the total ``gain`` bought."""

    ranks: dict[str, int] = field(default_factory=dict)
    whole: list[str] = field(default_factory=list)
    used: int = 0
    budget: int = 0
    gain: float = 0.0


def allocate(
    low_rank: Sequence[LowRank],
    rank_gains: Mapping[str, Sequence[float]],
    whole: Sequence[WholeParams],
    param_gains: Mapping[str, float],
    budget: int,
    *,
    min_rank: int = 1,
    max_rank: int = 64,
    per_module: bool = False,
) -> Allocation:
    """The greedy allocation of ``budget`` parameters.

    Args:
        low_rank: Low-rank candidates; ``rank_gains[name][k]`` is the gain of rank ``k + 1`` (must be
            non-increasing; entries past the list count as zero).
        whole: Whole-parameter candidates; ``param_gains[param_name]`` is each parameter's gain, and a
            parameter already bought with another candidate costs and gains nothing again.
        budget: Trainable parameters to spend at most.
        min_rank: A chosen module gets at least this rank (bought as one block).
        max_rank: No module gets more than this (nor more than ``min(rows, cols)``).
        per_module: A chosen module also costs one parameter per output channel (DoRA's magnitude).
    """
    if min_rank < 1 or max_rank < min_rank:
        raise ValueError(f"need 1 <= min_rank <= max_rank, got min_rank={min_rank}, max_rank={max_rank}")
    out = Allocation(budget=int(budget))
    left = int(budget)
    # (-gain per parameter, next rank, candidate index): ties go to the lower rank (spread before
    # deepening), then to the module earlier in the model
    heap: list[tuple[float, int, int]] = []
    caps = [min(max_rank, c.max_rank) for c in low_rank]
    fixed = [c.out_features if per_module else 0 for c in low_rank]
    for i, cand in enumerate(low_rank):
        if caps[i] >= min_rank:
            _push(heap, i, cand, rank_gains.get(cand.name, ()), 0, min_rank, fixed[i])
    covered: set[str] = set()
    open_whole = list(range(len(whole)))
    while True:
        while (
            heap
            and _step_cost(
                low_rank[heap[0][2]], out.ranks.get(low_rank[heap[0][2]].name, 0), min_rank, fixed[heap[0][2]]
            )
            > left
        ):
            heapq.heappop(heap)  # a module's next step costs the same or more later on: drop it
        best_whole = _best_whole(whole, open_whole, param_gains, covered, left)
        low_ratio = -heap[0][0] if heap else 0.0
        whole_ratio = best_whole[0] if best_whole else 0.0
        if max(low_ratio, whole_ratio) <= 0.0:
            break
        if low_ratio >= whole_ratio:  # ties go to the low-rank item (earlier in the model)
            _, _, i = heapq.heappop(heap)
            cand = low_rank[i]
            have = out.ranks.get(cand.name, 0)
            take = min_rank if have == 0 else 1
            gains = rank_gains.get(cand.name, ())
            out.gain += sum(_gain(gains, k) for k in range(have, have + take))
            out.ranks[cand.name] = have + take
            cost = _step_cost(cand, have, min_rank, fixed[i])
            left -= cost
            out.used += cost
            if have + take < caps[i]:
                _push(heap, i, cand, gains, have + take, 1, 0)
        else:
            _, j, cost, gain = best_whole
            open_whole.remove(j)
            out.whole.append(whole[j].name)
            covered.update(whole[j].params)
            out.gain += gain
            left -= cost
            out.used += cost
    return out


def _gain(gains: Sequence[float], k: int) -> float:
    return float(gains[k]) if k < len(gains) else 0.0


def _push(
    heap: list, i: int, cand: LowRank, gains: Sequence[float], have: int, take: int, fixed: int
) -> None:
    gain = sum(_gain(gains, k) for k in range(have, have + take))
    heapq.heappush(heap, (-gain / (take * cand.cost_per_rank + fixed), have + take, i))


def _step_cost(cand: LowRank, have: int, min_rank: int, fixed: int) -> int:
    return min_rank * cand.cost_per_rank + fixed if have == 0 else cand.cost_per_rank


def _best_whole(
    whole: Sequence[WholeParams],
    open_whole: list[int],
    param_gains: Mapping[str, float],
    covered: set[str],
    left: int,
) -> tuple[float, int, int, float] | None:
    """(gain per parameter, index, cost, gain) of the best whole candidate that fits, given what is covered."""
    best = None
    for j in open_whole:
        fresh = {n: size for n, size in whole[j].params.items() if n not in covered}
        cost = sum(fresh.values())
        if cost == 0 or cost > left:
            continue
        gain = sum(float(param_gains.get(n, 0.0)) for n in fresh)
        ratio = gain / cost
        if best is None or ratio > best[0]:
            best = (ratio, j, cost, gain)
    return best


def random_allocation(
    low_rank: Sequence[LowRank], budget: int, rank: int, seed: int, per_module: bool = False
) -> Allocation:
    """A control: modules drawn uniformly at random (embeddings excepted), each at ``rank`` while the
    budget allows, then one more at the highest rank that still fits. No whole parameters."""
    pool = [c for c in low_rank if c.kind != "Embedding"]
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    out = Allocation(budget=int(budget))
    left = int(budget)
    for i in order:
        cand = pool[i]
        fixed = cand.out_features if per_module else 0
        r = min(rank, cand.max_rank, (left - fixed) // cand.cost_per_rank)
        if r < 1:
            continue
        out.ranks[cand.name] = r
        left -= r * cand.cost_per_rank + fixed
        out.used += r * cand.cost_per_rank + fixed
        if r < rank:
            break
    # report in model order
    position = {c.name: k for k, c in enumerate(low_rank)}
    out.ranks = dict(sorted(out.ranks.items(), key=lambda kv: position[kv[0]]))
    return out

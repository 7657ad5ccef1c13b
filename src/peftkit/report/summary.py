"""From run records to one summary row per method: means and spreads over seeds, time to target, the
Pareto front of quality against trainable parameters.

Every number in a report comes from here, computed from the JSON records alone, so a test can check
the report against the records and anyone can recompute it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

OK_STATUSES = ("completed", "early_stopped")


@dataclass
class Stat:
    """Mean, sample standard deviation and count of one quantity over seeds (None: not measured)."""

    mean: float | None
    sd: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Stat:
        kept = [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]
        if not kept:
            return cls(None, None, 0)
        return cls(statistics.mean(kept), statistics.stdev(kept) if len(kept) > 1 else 0.0, len(kept))


@dataclass
class MethodSummary:
    """One row of the comparison: a run name over its seeds."""

    name: str
    method: str
    seeds: int
    finished: int
    metric: Stat
    trainable_params: int | None
    trainable_percent: float | None
    artifact_bytes: int | None
    peak_memory_mb: Stat
    train_seconds: Stat
    examples_per_s: Stat
    time_to_target: Stat
    target_reached: int
    latency_base_ms: Stat
    latency_unmerged_ms: Stat
    latency_merged_ms: Stat
    forgetting: Stat
    forgetting_measure: str | None
    pareto: bool = False
    statuses: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class Summary:
    """Every method's row plus what the rows were measured with."""

    rows: list[MethodSummary]
    metric: str
    greater_is_better: bool
    target: float | None
    target_fraction: float
    reference: str | None
    task: str | None
    model: str | None
    forgetting_source: str | None
    baseline: float | None = None  # the test metric of the task's floor (a classifier's majority class)
    baseline_name: str | None = None
    latency_spread: float | None = None  # (max - min) / median of the base model's latency over runs


def test_metric(record: dict[str, Any]) -> float | None:
    value = (record.get("test") or {}).get(record.get("metric"))
    return float(value) if isinstance(value, int | float) else None


def target_value(best: float, fraction: float, greater_is_better: bool) -> float:
    """The value that counts as reaching ``fraction`` of ``best``: ``best * fraction`` for a metric where
    more is better, ``best / fraction`` for one where less is (a loss, a perplexity)."""
    return best * fraction if greater_is_better else best / fraction


def time_to_target(record: dict[str, Any], target: float, greater_is_better: bool) -> float | None:
    """Seconds of training until the first evaluation at or beyond ``target`` (None: never reached)."""
    for _step, value, elapsed, *_ in (record.get("curves") or {}).get("eval", []):
        if value is not None and (value >= target if greater_is_better else value <= target):
            return float(elapsed)
    return None


def pareto_front(points: Sequence[tuple[float, float]], greater_is_better: bool) -> list[int]:
    """Indices of the points no other point beats: fewer (or as few) parameters and a better (or
    equal) metric, strictly better in one of the two."""
    front = []
    for i, (params, value) in enumerate(points):
        dominated = False
        for j, (p2, v2) in enumerate(points):
            better = v2 >= value if greater_is_better else v2 <= value
            strictly = p2 < params or (v2 > value if greater_is_better else v2 < value)
            if j != i and p2 <= params and better and strictly:
                dominated = True
                break
        if not dominated:
            front.append(i)
    return front


def summarise(
    records: Sequence[dict[str, Any]],
    names: Sequence[str] | None = None,
    *,
    target_fraction: float = 0.95,
    reference: str | None = "full",
    baseline: dict[str, Any] | None = None,
) -> Summary:
    """One :class:`MethodSummary` per run name, in ``names`` order (else first-seen order).

    The target for "time to target" is ``target_fraction`` of the mean best validation metric of the
    ``reference`` run (full fine-tuning), or of the best run by that measure when there is no reference.
    ``baseline`` is the task's floor (``Task.baseline``): a row must beat it by more than its spread over
    seeds to be on the Pareto front, since a run at the majority class trades nothing for its parameters.
    """
    names = list(names or dict.fromkeys(r["name"] for r in records))
    by_name = {name: [r for r in records if r.get("name") == name] for name in names}
    ok = [r for r in records if r.get("status") in OK_STATUSES]
    metric = next(
        (r["metric"] for r in ok), next((r.get("metric") for r in records if r.get("metric")), "metric")
    )
    greater = next((bool(r["greater_is_better"]) for r in ok), True)
    best_by_name = {
        n: Stat.of([r.get("best_validation") for r in rs if r.get("status") in OK_STATUSES]).mean
        for n, rs in by_name.items()
    }
    known = {n: v for n, v in best_by_name.items() if v is not None}
    if reference not in known:
        reference = (max if greater else min)(known, key=known.get) if known else None
    target = target_value(known[reference], target_fraction, greater) if reference else None
    rows = [_row(name, by_name[name], target, greater) for name in names]
    floor = (baseline or {}).get(metric)
    floor = float(floor) if isinstance(floor, int | float) else None
    measured = [
        i
        for i, row in enumerate(rows)
        if row.metric.mean is not None
        and row.trainable_params
        and (floor is None or _clears(row.metric, floor, greater))
    ]
    for k in pareto_front([(rows[i].trainable_params, rows[i].metric.mean) for i in measured], greater):
        rows[measured[k]].pareto = True
    forgetting_source = next(
        (r["forgetting"].get("source") for r in ok if "source" in (r.get("forgetting") or {})), None
    )
    first = records[0] if records else {}
    bases = sorted(
        float((r.get("latency_ms") or {})["base"])
        for r in ok
        if isinstance((r.get("latency_ms") or {}).get("base"), int | float)
    )
    spread = (
        (bases[-1] - bases[0]) / statistics.median(bases)
        if len(bases) > 1 and statistics.median(bases)
        else None
    )
    return Summary(
        rows,
        metric,
        greater,
        target,
        target_fraction,
        reference,
        first.get("task"),
        first.get("model"),
        forgetting_source,
        floor,
        (baseline or {}).get("name") if floor is not None else None,
        spread,
    )


def _clears(value: Stat, floor: float, greater: bool) -> bool:
    """The mean beats ``floor`` by more than the spread over seeds (and at all)."""
    margin = (value.mean - floor) if greater else (floor - value.mean)
    return margin > max(value.sd or 0.0, 1e-9)


def _row(name: str, records: list[dict[str, Any]], target: float | None, greater: bool) -> MethodSummary:
    ok = [r for r in records if r.get("status") in OK_STATUSES]
    statuses: dict[str, int] = {}
    for r in records:
        statuses[r.get("status", "?")] = statuses.get(r.get("status", "?"), 0) + 1
    latency = [r.get("latency_ms") or {} for r in ok]
    forgetting = [r.get("forgetting") or {} for r in ok]
    times = [time_to_target(r, target, greater) for r in ok] if target is not None else []
    notes = sorted(
        {lat["merged_note"] for lat in latency if lat.get("merged_note")}
        | {f["error"] for f in forgetting if f.get("error")}
        | {f"{r['seed']}: {r.get('error') or r.get('stop_reason')}" for r in records if r not in ok}
    )
    first = ok[0] if ok else (records[0] if records else {})
    return MethodSummary(
        name=name,
        method=str(first.get("method") or "?"),
        seeds=len(records),
        finished=len(ok),
        metric=Stat.of([test_metric(r) for r in ok]),
        trainable_params=first.get("trainable_params"),
        trainable_percent=first.get("trainable_percent"),
        artifact_bytes=first.get("artifact_bytes"),
        peak_memory_mb=Stat.of([r.get("peak_memory_mb") for r in ok]),
        train_seconds=Stat.of([r.get("train_seconds") for r in ok]),
        examples_per_s=Stat.of([r.get("examples_per_s") for r in ok]),
        time_to_target=Stat.of(times),
        target_reached=sum(t is not None for t in times),
        latency_base_ms=Stat.of([lat.get("base") for lat in latency]),
        latency_unmerged_ms=Stat.of([lat.get("unmerged") for lat in latency]),
        latency_merged_ms=Stat.of([lat.get("merged") for lat in latency]),
        forgetting=Stat.of([f.get("forgetting") for f in forgetting]),
        forgetting_measure=next((f["measure"] for f in forgetting if f.get("measure")), None),
        statuses=statuses,
        notes=notes,
    )

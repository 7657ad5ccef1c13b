"""Fair comparisons: choose each run's learning rate (and any listed field) on the validation split.

One learning rate for every method is not a comparison: published rates differ by two orders of
magnitude between full fine-tuning and soft prompts. With ``compare.tune`` each tuned run first trains
once per candidate with seeds of its own (after the test seeds, so the seeds whose test numbers are
reported never take part in the choice), keeps the candidate with the best validation metric (the
mean over the search seeds of each trial's best evaluation), and only then trains the test seeds at it::

    compare:
      tune: {seeds: 1}                     # every run, each method's own candidates (its registry entry)
      tune: {lr: [1e-3, 3e-3], steps: 40}  # these candidates for every run, trials of 40 steps
      runs:
        - {name: lora, adapter: {method: lora}, tune: {lr: [5e-4, 2e-3]}}   # this run's own candidates
        - {name: full, adapter: {method: full}, tune: false}                 # not tuned

Keys other than ``seeds`` and ``steps`` are dotted field paths with candidate lists (``lr`` is short for
``train.lr``); several fields are searched as their full grid. Where no ``train.lr`` candidates are given,
the method's own ``lr_candidates`` are tried. Each trial is a record under ``records/tune/``, so an
interrupted search continues where it stopped; ``tuning.json`` holds the outcome and its cost.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..run.adapter import lr_candidates
from .config import PlannedRun, config_key, plan_run

LR = "train.lr"
SECTIONS = ("model", "data", "adapter", "train", "eval", "select")
TUNING_FILE = "tuning.json"


@dataclass
class TuneSettings:
    """A checked ``tune`` mapping: candidates per dotted field, search seeds and trial length."""

    fields: dict[str, list[Any]] = field(default_factory=dict)
    seeds: int = 1
    steps: int | None = None


@dataclass
class Trial:
    """One training run of a search: candidate ``index`` with one search seed."""

    index: int
    run: PlannedRun


@dataclass
class TunePlan:
    """The search of one run: its candidates (dotted field -> value) and their trials."""

    name: str
    candidates: list[dict[str, Any]]
    trials: list[Trial]


def parse_tune(value: Any, where: str, problems: list[str], allow_false: bool = False) -> TuneSettings | None:
    """The settings of a ``tune`` mapping (None when tuning is off); problems go to ``problems``."""
    if value is None or (allow_false and value is False):
        return None
    if value is True:
        return TuneSettings()
    if not isinstance(value, Mapping):
        problems.append(
            f"{where}: expected a mapping such as {{lr: [1e-4, 1e-3], seeds: 1}}"
            + (", or false" if allow_false else "")
            + f", got {value!r}"
        )
        return None
    out = TuneSettings()
    for key, candidates in value.items():
        if key == "seeds":
            if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
                problems.append(
                    f"{where}.seeds: expected a positive number of search seeds, got {candidates!r}"
                )
            else:
                out.seeds = candidates
            continue
        if key == "steps":
            if candidates is not None and (
                isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1
            ):
                problems.append(
                    f"{where}.steps: expected a positive number of steps per trial (or null: "
                    f"train.steps), got {candidates!r}"
                )
            else:
                out.steps = candidates
            continue
        path = LR if key == "lr" else str(key)
        section, dot, rest = path.partition(".")
        if not dot or not rest or section not in SECTIONS:
            problems.append(
                f"{where}.{key}: unknown key; give seeds, steps, lr, or a dotted field such as "
                f"adapter.r (sections: {', '.join(SECTIONS)})"
            )
            continue
        if not isinstance(candidates, list) or not candidates:
            problems.append(
                f"{where}.{key}: expected a non-empty list of candidate values, got {candidates!r}"
            )
            continue
        if path == LR and not all(_positive(c) for c in candidates):
            problems.append(f"{where}.{key}: expected positive learning rates, got {candidates!r}")
            continue
        out.fields[path] = list(candidates)
    return out


def plan_search(
    name: str,
    template: Mapping[str, Any],
    shared: TuneSettings | None,
    own: TuneSettings | None,
    own_raw: Any,
    test_seeds: list[int],
    output_dir: Path,
    problems: list[str],
    where: str,
) -> TunePlan | None:
    """The search of one run, or None when it is not tuned (no ``compare.tune`` and no run ``tune``, or
    the run's ``tune: false``)."""
    if own_raw is False or (shared is None and own is None):
        return None
    settings = TuneSettings(
        fields=dict(shared.fields) if shared else {},
        seeds=shared.seeds if shared else 1,
        steps=shared.steps if shared else None,
    )
    if own is not None:
        settings.fields.update(own.fields)
        raw = own_raw if isinstance(own_raw, Mapping) else {}
        settings.seeds = own.seeds if "seeds" in raw else settings.seeds
        settings.steps = own.steps if "steps" in raw else settings.steps
    if LR not in settings.fields:
        settings.fields = {LR: list(lr_candidates(dict(template.get("adapter") or {}))), **settings.fields}
    paths = list(settings.fields)
    candidates = [
        dict(zip(paths, values)) for values in itertools.product(*(settings.fields[p] for p in paths))
    ]
    seeds = [max(test_seeds) + 1 + i for i in range(settings.seeds)]
    trials = []
    for index, candidate in enumerate(candidates):
        overrides = dict(candidate)
        if settings.steps is not None:
            overrides["train.steps"] = settings.steps
        for seed in seeds:
            run_dir = output_dir / "tune" / name / f"{label(candidate)}-seed-{seed}"
            config = plan_run(
                template,
                name,
                seed,
                output_dir,
                overrides,
                problems,
                f"{where} tune {label(candidate)}",
                run_dir=run_dir,
            )
            if config is None:
                return None
            trials.append(Trial(index, PlannedRun(name, seed, config, config_key(config))))
    return TunePlan(name, candidates, trials)


def label(candidate: Mapping[str, Any]) -> str:
    """A file-name-safe label of a candidate: ``lr-0.002``, ``lr-0.002_r-8``."""
    parts = [
        f"{path.rpartition('.')[2]}-{value:g}"
        if isinstance(value, float)
        else f"{path.rpartition('.')[2]}-{value}"
        for path, value in candidate.items()
    ]
    return re.sub(r"[^A-Za-z0-9_.+-]", "", "_".join(parts).replace("train.", ""))


def trial_record_path(output_dir: Path, trial: Trial, plan: TunePlan) -> Path:
    return (
        output_dir
        / "records"
        / "tune"
        / f"{plan.name}-{label(plan.candidates[trial.index])}-seed{trial.run.seed}.json"
    )


def choose(
    plan: TunePlan, records: Mapping[int, list[dict[str, Any] | None]], greater_is_better: bool
) -> dict[str, Any]:
    """The outcome of one search: every candidate's mean best validation metric and the winner.

    A candidate whose trials all failed or diverged (no validation value) cannot win; with no usable
    candidate at all ``chosen`` is None and the run keeps its configured values.
    """
    rows = []
    for index, candidate in enumerate(plan.candidates):
        mine = [r for r in records.get(index, []) if r]
        values = [r["best_validation"] for r in mine if _finite(r.get("best_validation"))]
        rows.append(
            {
                "candidate": candidate,
                "label": label(candidate),
                "validation": statistics.mean(values) if values else None,
                "curve_mean": _curve_mean(mine),
                "per_seed": [r.get("best_validation") for r in mine],
                "status": sorted({str(r.get("status")) for r in mine}) or ["missing"],
                "seconds": sum(float(r.get("wall_seconds") or 0.0) for r in mine),
            }
        )
    usable = [r for r in rows if r["validation"] is not None]
    sign = 1 if greater_is_better else -1
    best = None
    # Equal best values are common (accuracy on a few hundred examples moves in steps of 1/n): among them
    # the candidate whose validation curve was better on average (it got there sooner and held it) wins,
    # then the first listed, so the result does not depend on float noise in the order of ties.
    for row in usable:
        if best is None or sign * row["validation"] > sign * best["validation"]:
            best = row
        elif row["validation"] == best["validation"] and _ahead(row["curve_mean"], best["curve_mean"], sign):
            best = row
    edge = None
    if best is not None and LR in best["candidate"]:
        rates = sorted({c[LR] for c in plan.candidates if LR in c})
        if len(rates) > 1 and best["candidate"][LR] in (rates[0], rates[-1]):
            edge = "lowest" if best["candidate"][LR] == rates[0] else "highest"
    return {
        "name": plan.name,
        "candidates": rows,
        "chosen": best["candidate"] if best else None,
        "edge": edge,
        "chosen_label": best["label"] if best else None,
        "chosen_validation": best["validation"] if best else None,
        "trials": len(plan.trials),
        "seeds": sorted({t.run.seed for t in plan.trials}),
        "steps": plan.trials[0].run.config.train.steps if plan.trials else None,
        "seconds": sum(r["seconds"] for r in rows),
    }


def _curve_mean(records: list[dict[str, Any]]) -> float | None:
    """The mean over a candidate's trials of each trial's mean validation metric over its evaluations."""
    means = []
    for record in records:
        values = [point[1] for point in (record.get("curves") or {}).get("eval") or [] if _finite(point[1])]
        if values:
            means.append(statistics.mean(values))
    return statistics.mean(means) if means else None


def _ahead(value: float | None, other: float | None, sign: int) -> bool:
    return value is not None and (other is None or sign * value > sign * other)


RunOne = Callable[[PlannedRun, Path, str], dict[str, Any] | None]


def run_searches(config: Any, run_one: RunOne, log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Run every trial of ``config.tuning`` that has no current record and choose each run's values.

    Args:
        config: The comparison (:class:`peftkit.compare.CompareConfig`).
        run_one: Trains and records one trial: ``(run, record_path, label) -> record``.
        log: Where progress lines go.

    Returns:
        Run name -> outcome (:func:`choose`), also written to ``tuning.json`` in the comparison's directory.
    """
    from .runner import is_current, read_record

    out = config.output_dir
    greater = next((r.config.train.maximize for r in config.runs), True)
    outcomes: dict[str, dict[str, Any]] = {}
    for plan in config.tuning.values():
        todo = [t for t in plan.trials if not is_current(read_record(trial_record_path(out, t, plan)), t.run)]
        if todo:
            log(
                f"tuning {plan.name}: {len(plan.candidates)} candidate(s) x {len(plan.trials) // len(plan.candidates)} "
                f"search seed(s), {len(todo)} trial(s) to run"
            )
        for trial in todo:
            what = label(plan.candidates[trial.index])
            record = run_one(
                trial.run,
                trial_record_path(out, trial, plan),
                f"{plan.name} tune {what} seed {trial.run.seed}",
            )
            value = (record or {}).get("best_validation")
            log(
                f"    {plan.name} {what}: best validation {value:.4f}"
                if _finite(value)
                else f"    {plan.name} {what}: {(record or {}).get('status', 'no record')}"
            )
        records: dict[int, list[dict[str, Any] | None]] = {}
        for trial in plan.trials:
            records.setdefault(trial.index, []).append(read_record(trial_record_path(out, trial, plan)))
        outcome = choose(plan, records, greater)
        outcomes[plan.name] = outcome
        chosen = outcome["chosen"]
        log(
            f"tuning {plan.name}: chose {label(chosen) if chosen else 'nothing (no trial finished)'}"
            + (
                f" (validation {outcome['chosen_validation']:.4f})"
                if chosen
                else "; it keeps its configured values"
            )
            + (
                f"; the {outcome['edge']} learning rate tried: a wider list may find a better one"
                if outcome.get("edge")
                else ""
            )
        )
    if outcomes:
        (out / TUNING_FILE).write_text(json.dumps(outcomes, indent=1, default=str) + "\n")
    return outcomes


def read_outcomes(output_dir: Path) -> dict[str, dict[str, Any]]:
    """The searches' outcomes a comparison wrote (empty when it tuned nothing)."""
    try:
        return json.loads((Path(output_dir) / TUNING_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


__all__ = [
    "TUNING_FILE",
    "TunePlan",
    "TuneSettings",
    "choose",
    "label",
    "parse_tune",
    "plan_search",
    "read_outcomes",
    "run_searches",
]

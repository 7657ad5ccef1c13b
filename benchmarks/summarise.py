"""Pair, summarise and tabulate benchmark records: ``python -m benchmarks.summarise RESULTS.json``.

The records of one case are paired by repetition: repetition i of peftkit ran right before
repetition i of the reference library, so the two saw nearly the same machine load, and their ratio
cancels most of the drift that makes absolute timings on a shared machine wander by 5-20%. What is
reported for a comparison is the median of the per-pair ratios and their spread (min-max and the
interquartile range), never a ratio of separately taken averages.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

PEFTKIT, REFERENCE, FULL = "peftkit", "peft", "torch"

# The targets. "kind" says which records they read; "<=" thresholds on ratios peftkit / reference.
LORA_STEP_TIME, DORA_STEP_TIME = 0.90, 0.80
MEMORY_VS_REFERENCE, MEMORY_VS_FULL = 0.85, 1.0
UNMERGED_OVERHEAD_SHARE, MERGED_WITHIN = 0.5, 0.02
MIXED_OVER_SINGLE, MIXED_VS_REFERENCE = 1.3, 1.0


def stats(values: Iterable[float | None]) -> dict[str, Any] | None:
    """Median, min, max, quartiles and count of the values present (None values are dropped)."""
    present = sorted(v for v in values if v is not None)
    if not present:
        return None
    if len(present) >= 2:
        q1, _, q3 = statistics.quantiles(present, n=4, method="inclusive")
    else:
        q1 = q3 = present[0]
    return {
        "median": statistics.median(present),
        "min": present[0],
        "max": present[-1],
        "q1": q1,
        "q3": q3,
        "n": len(present),
    }


def by_rep(records: list[dict[str, Any]], case: str, lib: str, metric: str) -> dict[int, float]:
    """``{repetition: value}`` of ``metric`` from the successful records of (case, lib)."""
    out = {}
    for record in records:
        if record["case"] == case and record["lib"] == lib and record.get("ok"):
            value = record.get("metrics", {}).get(metric)
            if value is not None:
                out[record["rep"]] = value
    return out


def paired_ratios(numerator: dict[int, float], denominator: dict[int, float]) -> list[float]:
    """``numerator[i] / denominator[i]`` for every repetition both have, in repetition order."""
    return [
        numerator[i] / denominator[i] for i in sorted(set(numerator) & set(denominator)) if denominator[i]
    ]


def _full_case(case: dict[str, Any], cases: list[dict[str, Any]]) -> str | None:
    for other in cases:
        if other["kind"] == "train" and other["method"] == "full" and other["model"] == case["model"]:
            return other["name"]
    return None


METRICS = {
    "train": ["step_s", "first_step_s", "peak_mb", "overhead_mb", "loaded_mb", "peak_rss_mb"],
    "infer": ["base_s", "unmerged_s", "merged_s", "unmerged_overhead", "merged_overhead", "save_s", "load_s"],
    "mixed": ["single_s", "mixed_s", "mixed_over_single"],
}
RATIOS = {  # metrics compared peftkit / reference pair by pair
    "train": ["step_s", "first_step_s", "peak_mb", "overhead_mb"],
    "infer": ["unmerged_s", "save_s", "load_s"],
    "mixed": ["mixed_s", "single_s"],
}


def summarise_case(
    records: list[dict[str, Any]], case: dict[str, Any], cases: list[dict[str, Any]]
) -> dict[str, Any]:
    """Per library, stats of every metric; per compared metric, stats of the paired ratios."""
    name, kind = case["name"], case["kind"]
    out: dict[str, Any] = {
        "kind": kind,
        "model": case["model"],
        "method": case["method"],
        "targets": case["targets"],
        "libs": {},
        "ratios": {},
        "errors": [],
        "notes": [],
    }
    for lib in case["libs"]:
        out["libs"][lib] = {m: stats(by_rep(records, name, lib, m).values()) for m in METRICS[kind]}
    for record in records:
        if record["case"] != name:
            continue
        if not record.get("ok"):
            out["errors"].append(f"{record['lib']} rep {record['rep']}: {record.get('error')}")
        note = record.get("info", {}).get("mixed_unavailable")
        if note and f"{record['lib']}: {note}" not in out["notes"]:
            out["notes"].append(f"{record['lib']}: {note}")
    if PEFTKIT in case["libs"] and REFERENCE in case["libs"]:
        for metric in RATIOS[kind]:
            ratios = paired_ratios(
                by_rep(records, name, PEFTKIT, metric), by_rep(records, name, REFERENCE, metric)
            )
            out["ratios"][f"{metric} peftkit/peft"] = stats(ratios)
    full = _full_case(case, cases) if kind == "train" and case["method"] != "full" else None
    if full:
        for lib in case["libs"]:
            for metric in ("step_s", "peak_mb"):
                ratios = paired_ratios(
                    by_rep(records, name, lib, metric), by_rep(records, full, FULL, metric)
                )
                out["ratios"][f"{metric} {lib}/full"] = stats(ratios)
    return out


def _median(summary: dict[str, Any] | None) -> float | None:
    return summary["median"] if summary else None


def _target(
    text: str,
    case: str,
    value: float | None,
    threshold: float,
    op: str = "<=",
    why_none: str = "not measured",
) -> dict[str, Any]:
    if value is None:
        return {
            "target": text,
            "case": case,
            "value": None,
            "threshold": threshold,
            "op": op,
            "met": None,
            "verdict": why_none,
        }
    met = value <= threshold if op == "<=" else value < threshold
    gap = value - threshold
    verdict = "met" if met else f"missed by {gap:.3g} ({100 * gap / threshold:+.1f}% of the threshold)"
    return {
        "target": text,
        "case": case,
        "value": value,
        "threshold": threshold,
        "op": op,
        "met": met,
        "verdict": verdict,
    }


def targets(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, each with its value (a median of paired ratios where it compares libraries)."""
    out = []
    for name, case in summary.items():
        ratios, libs = case["ratios"], case["libs"]
        if case["kind"] == "train" and case["method"] in ("lora", "dora"):
            limit = DORA_STEP_TIME if case["method"] == "dora" else LORA_STEP_TIME
            out.append(
                _target(
                    f"{case['method']} step time peftkit/peft <= {limit}",
                    name,
                    _median(ratios.get("step_s peftkit/peft")),
                    limit,
                )
            )
            if case["method"] == "lora" and case["targets"] == "all":
                out.append(
                    _target(
                        f"peak training memory peftkit/peft <= {MEMORY_VS_REFERENCE}",
                        name,
                        _median(ratios.get("peak_mb peftkit/peft")),
                        MEMORY_VS_REFERENCE,
                    )
                )
                out.append(
                    _target(
                        "peak training memory peftkit/full fine-tuning <= 1",
                        name,
                        _median(ratios.get("peak_mb peftkit/full")),
                        MEMORY_VS_FULL,
                    )
                )
        elif case["kind"] == "infer" and PEFTKIT in libs and REFERENCE in libs:
            ours = _median(libs[PEFTKIT].get("unmerged_overhead"))
            theirs = _median(libs[REFERENCE].get("unmerged_overhead"))
            share, why = None, "not measured"
            if ours is not None and theirs is not None:
                if theirs > 0:
                    share = ours / theirs
                else:
                    why = (
                        f"not measurable: the reference's unmerged overhead is {theirs:+.3f} (none to halve)"
                    )
            out.append(
                _target(
                    f"unmerged overhead over base, peftkit/peft <= {UNMERGED_OVERHEAD_SHARE}",
                    name,
                    share,
                    UNMERGED_OVERHEAD_SHARE,
                    why_none=why,
                )
            )
            merged = _median(libs[PEFTKIT].get("merged_overhead"))
            out.append(
                _target(
                    f"merged latency within {MERGED_WITHIN:.0%} of base (abs(merged/base - 1))",
                    name,
                    None if merged is None else abs(merged),
                    MERGED_WITHIN,
                )
            )
        elif case["kind"] == "mixed" and PEFTKIT in libs:
            why = "; ".join(case["notes"]) or "not measured"
            out.append(
                _target(
                    f"4-adapter mixed batch / single-adapter batch (peftkit) <= {MIXED_OVER_SINGLE}",
                    name,
                    _median(libs[PEFTKIT].get("mixed_over_single")),
                    MIXED_OVER_SINGLE,
                    why_none=why,
                )
            )
            out.append(
                _target(
                    "mixed batch time peftkit/peft < 1",
                    name,
                    _median(ratios.get("mixed_s peftkit/peft")),
                    MIXED_VS_REFERENCE,
                    op="<",
                    why_none=why,
                )
            )
    return out


def summarise(records: list[dict[str, Any]], cases: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"cases": {name: case summary}, "targets": [...]}`` for the cases as dicts (``Case.to_dict``)."""
    per_case = {case["name"]: summarise_case(records, case, cases) for case in cases}
    return {"cases": per_case, "targets": targets(per_case)}


# -- Markdown --------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if abs(value) >= 10**digits:  # 2448 ms, not 2.45e+03
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def _ratio(summary: dict[str, Any] | None) -> str:
    """``0.84 (0.80-0.90)``: median of the paired ratios, then their min-max."""
    if not summary:
        return "n/a"
    return f"{summary['median']:.3f} ({summary['min']:.3f}-{summary['max']:.3f})"


def _med(case: dict[str, Any], lib: str, metric: str, scale: float = 1.0, digits: int = 3) -> str:
    value = _median(case["libs"].get(lib, {}).get(metric))
    return _fmt(None if value is None else value * scale, digits)


def _pct(case: dict[str, Any], lib: str, metric: str) -> str:
    value = _median(case["libs"].get(lib, {}).get(metric))
    return "n/a" if value is None else f"{100 * value:+.1f}%"


def markdown(result: dict[str, Any]) -> str:
    """The tables of ``docs/performance.md`` for one results file."""
    summary, meta = result["summary"], result.get("meta", {})
    cases = summary["cases"]
    memory = "peak RSS" if meta.get("device", "cpu") == "cpu" else "peak CUDA memory allocated"
    lines = [
        f"Ratios are peftkit / reference (peft) medians of per-repetition pairs, min-max in brackets; "
        f"{meta.get('reps_done', meta.get('reps', '?'))} repetitions, each configuration in a fresh process.",
        "",
    ]
    train = {n: c for n, c in cases.items() if c["kind"] == "train" and c["method"] != "full"}
    full = {c["model"]: n for n, c in cases.items() if c["kind"] == "train" and c["method"] == "full"}
    if train or full:
        lines += [
            "**Training step** (forward + backward + AdamW), seconds per step in the steady state: the "
            "median of the timed full-size steps of each process, after one untimed full-size step. "
            "'first' is that first step (optimizer state, kernel set-up, allocator growth):",
            "",
            "| case | peftkit | peft | full FT | peftkit/peft | peftkit/full | peft/full | "
            "first: peftkit | peft | full FT | first peftkit/peft |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, case in train.items():
            full_case = cases.get(full.get(case["model"], ""), {"libs": {}})
            r = case["ratios"]
            lines.append(
                f"| {name} | {_med(case, PEFTKIT, 'step_s')} | {_med(case, REFERENCE, 'step_s')} | "
                f"{_med(full_case, FULL, 'step_s')} | {_ratio(r.get('step_s peftkit/peft'))} | "
                f"{_ratio(r.get('step_s peftkit/full'))} | {_ratio(r.get('step_s peft/full'))} | "
                f"{_med(case, PEFTKIT, 'first_step_s')} | {_med(case, REFERENCE, 'first_step_s')} | "
                f"{_med(full_case, FULL, 'first_step_s')} | {_ratio(r.get('first_step_s peftkit/peft'))} |"
            )
        lines += [
            "",
            f"**Training memory**, MB ({memory}; 'added' = peak minus the memory after the model and "
            "adapter were built, before the first step):",
            "",
            "| case | peftkit peak | peft peak | full FT peak | peak peftkit/peft | peak peftkit/full | "
            "peftkit added | peft added | full FT added | added peftkit/peft |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, case in train.items():
            full_case = cases.get(full.get(case["model"], ""), {"libs": {}})
            r = case["ratios"]
            lines.append(
                f"| {name} | {_med(case, PEFTKIT, 'peak_mb', digits=4)} | {_med(case, REFERENCE, 'peak_mb', digits=4)} | "
                f"{_med(full_case, FULL, 'peak_mb', digits=4)} | {_ratio(r.get('peak_mb peftkit/peft'))} | "
                f"{_ratio(r.get('peak_mb peftkit/full'))} | {_med(case, PEFTKIT, 'overhead_mb', digits=4)} | "
                f"{_med(case, REFERENCE, 'overhead_mb', digits=4)} | {_med(full_case, FULL, 'overhead_mb', digits=4)} | "
                f"{_ratio(r.get('overhead_mb peftkit/peft'))} |"
            )
    infer = {n: c for n, c in cases.items() if c["kind"] == "infer"}
    if infer:
        lines += [
            "",
            "**Inference** (one forward, no grad), milliseconds; overhead = unmerged/base - 1, median of "
            "the per-round ratios within each process:",
            "",
            "| case | lib | base | unmerged | merged | unmerged overhead | merged overhead |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, case in infer.items():
            for lib in case["libs"]:
                lines.append(
                    f"| {name} | {lib} | {_med(case, lib, 'base_s', 1e3)} | {_med(case, lib, 'unmerged_s', 1e3)} | "
                    f"{_med(case, lib, 'merged_s', 1e3)} | {_pct(case, lib, 'unmerged_overhead')} | "
                    f"{_pct(case, lib, 'merged_overhead')} |"
                )
        lines += [
            "",
            "**Adapter save and load**, milliseconds (load includes injecting into a fresh base):",
            "",
            "| case | save peftkit | save peft | save peftkit/peft | load peftkit | load peft | "
            "load peftkit/peft |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, case in infer.items():
            r = case["ratios"]
            lines.append(
                f"| {name} | {_med(case, PEFTKIT, 'save_s', 1e3)} | {_med(case, REFERENCE, 'save_s', 1e3)} | "
                f"{_ratio(r.get('save_s peftkit/peft'))} | {_med(case, PEFTKIT, 'load_s', 1e3)} | "
                f"{_med(case, REFERENCE, 'load_s', 1e3)} | {_ratio(r.get('load_s peftkit/peft'))} |"
            )
    mixed = {n: c for n, c in cases.items() if c["kind"] == "mixed"}
    if mixed:
        lines += [
            "",
            "**Mixed-adapter batch** (4 adapters, each example names its own), milliseconds:",
            "",
            "| case | lib | one adapter for the batch | 4 adapters mixed | mixed/single |",
            "|---|---|---|---|---|",
        ]
        for name, case in mixed.items():
            for lib in case["libs"]:
                lines.append(
                    f"| {name} | {lib} | {_med(case, lib, 'single_s', 1e3)} | {_med(case, lib, 'mixed_s', 1e3)} | "
                    f"{_med(case, lib, 'mixed_over_single')} |"
                )
            lines.append(
                f"| {name} | peftkit/peft | {_ratio(case['ratios'].get('single_s peftkit/peft'))} | "
                f"{_ratio(case['ratios'].get('mixed_s peftkit/peft'))} | |"
            )
            lines += [f"| {name} | note | {note} | | |" for note in case["notes"]]
    lines += ["", "**Targets** (issue 7):", "", "| target | case | value | verdict |", "|---|---|---|---|"]
    for t in summary["targets"]:
        lines.append(f"| {t['target']} | {t['case']} | {_fmt(t['value'])} | {t['verdict']} |")
    errors = [f"{n}: {e}" for n, c in cases.items() for e in c["errors"]]
    if errors:
        lines += ["", "Failed processes:", ""] + [f"- {e}" for e in errors]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(
            "usage: python -m benchmarks.summarise RESULTS.json  (prints the Markdown tables)",
            file=sys.stderr,
        )
        return 2
    result = json.loads(Path(argv[0]).read_text())
    if "summary" not in result:  # a partial file from an interrupted run: summarise what it has
        result["summary"] = summarise(result["records"], result["cases"])
    print(markdown(result), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

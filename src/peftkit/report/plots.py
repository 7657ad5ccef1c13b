"""The comparison's figures, drawn with matplotlib (Agg, no display) and returned as PNG bytes."""

from __future__ import annotations

import io
import statistics
from collections.abc import Sequence
from typing import Any

from .summary import MethodSummary, Summary

COLOURS = [
    "#4c72b0",
    "#dd8452",
    "#55a868",
    "#c44e52",
    "#8172b3",
    "#937860",
    "#da8bc3",
    "#8c8c8c",
    "#ccb974",
    "#64b5cd",
]


MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
LINESTYLES = ["-", "--", ":", "-."]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: never open a window, work without a display
    import matplotlib.pyplot as plt

    return plt


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(figure)
    return buffer.getvalue()


def colour_of(summary: Summary) -> dict[str, str]:
    return {row.name: COLOURS[i % len(COLOURS)] for i, row in enumerate(summary.rows)}


def quality_vs_parameters(summary: Summary) -> bytes:
    """Test metric (mean, error bar = sd over seeds) against trainable parameters on a log scale; the
    Pareto front is joined by a dashed line and its points ringed."""
    plt = _pyplot()
    colours = colour_of(summary)
    figure, axis = plt.subplots(figsize=(7.5, 4.6))
    rows = [r for r in summary.rows if r.metric.mean is not None and r.trainable_params]
    for row in rows:
        axis.errorbar(
            row.trainable_params,
            row.metric.mean,
            yerr=row.metric.sd or 0,
            fmt="o",
            ms=8,
            capsize=4,
            color=colours[row.name],
            label=row.name,
        )
        axis.annotate(
            row.name,
            (row.trainable_params, row.metric.mean),
            textcoords="offset points",
            xytext=(7, 6),
            fontsize=9,
        )
    front = sorted((r for r in rows if r.pareto), key=lambda r: r.trainable_params)
    if front:
        axis.plot(
            [r.trainable_params for r in front],
            [r.metric.mean for r in front],
            "--",
            color="#444",
            lw=1,
            label="Pareto front",
        )
        axis.scatter(
            [r.trainable_params for r in front],
            [r.metric.mean for r in front],
            s=220,
            facecolors="none",
            edgecolors="#444",
            linewidths=1.2,
        )
    if summary.baseline is not None:
        axis.axhline(summary.baseline, color="#999", ls=":", lw=1.2, label=summary.baseline_name)
    axis.set_xscale("log")
    axis.set_xlabel("trainable parameters (log scale)")
    axis.set_ylabel(f"test {summary.metric}" + ("" if summary.greater_is_better else " (lower is better)"))
    axis.set_title(f"Quality against trainable parameters ({_seeds(summary)})")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8, loc="best")
    return _png(figure)


def costs(summary: Summary) -> bytes:
    """Peak training memory, training time and forgetting per method (error bars: sd over seeds)."""
    plt = _pyplot()
    colours = colour_of(summary)
    panels = [
        ("peak training memory (MB)", lambda r: r.peak_memory_mb),
        ("training time (s)", lambda r: r.train_seconds),
        (f"forgetting ({_forgetting_measure(summary)})", lambda r: r.forgetting),
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(12, 0.45 * len(summary.rows) + 1.6))
    names = [r.name for r in summary.rows][::-1]
    for axis, (title, stat) in zip(axes, panels):
        values = [stat(r) for r in summary.rows][::-1]
        axis.barh(
            names,
            [v.mean or 0 for v in values],
            xerr=[v.sd or 0 for v in values],
            capsize=3,
            color=[colours[n] for n in names],
        )
        for y, v in enumerate(values):
            if v.mean is None:
                axis.text(0, y, " n/a", va="center", fontsize=8, color="#666")
        axis.set_title(title, fontsize=10)
        axis.grid(True, axis="x", alpha=0.3)
    for axis in axes[1:]:
        axis.set_yticklabels([])
    figure.tight_layout()
    return _png(figure)


def latency(summary: Summary) -> bytes:
    """Forward-pass latency per batch: base model, unmerged adapter, merged adapter."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(9, 3.8))
    kinds = [
        ("base", "latency_base_ms", "#bbbbbb"),
        ("unmerged", "latency_unmerged_ms", "#4c72b0"),
        ("merged", "latency_merged_ms", "#55a868"),
    ]
    width = 0.27
    for k, (label, attr, colour) in enumerate(kinds):
        stats = [getattr(r, attr) for r in summary.rows]
        xs = [i + (k - 1) * width for i in range(len(stats))]
        axis.bar(
            xs,
            [s.mean or 0 for s in stats],
            width,
            yerr=[s.sd or 0 for s in stats],
            capsize=2,
            color=colour,
            label=label,
        )
    axis.set_xticks(range(len(summary.rows)), [r.name for r in summary.rows], rotation=20, ha="right")
    axis.set_ylabel("ms per batch")
    axis.set_title("Inference latency (median forward pass; merged is missing where a method cannot merge)")
    axis.legend(fontsize=8)
    axis.grid(True, axis="y", alpha=0.3)
    return _png(figure)


def curves(summary: Summary, records: Sequence[dict[str, Any]]) -> bytes:
    """Training loss and validation metric by step, each the mean over the method's seeds."""
    plt = _pyplot()
    colours = colour_of(summary)
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for index, row in enumerate(summary.rows):
        mine = [r for r in records if r.get("name") == row.name and r.get("curves")]
        # runs often share values (the same validation accuracy at the same step): distinct markers and
        # dashes keep a curve hidden under another visible
        marker, dashes = MARKERS[index % len(MARKERS)], LINESTYLES[(index // len(MARKERS)) % len(LINESTYLES)]
        for axis, key, column in ((left, "train", 1), (right, "eval", 1)):
            steps, values = _mean_curve([r["curves"][key] for r in mine], column)
            if steps:
                axis.plot(
                    steps,
                    values,
                    marker=marker if key == "eval" else None,
                    ms=5,
                    mfc="none",
                    ls=dashes if key == "eval" else "-",
                    alpha=0.85,
                    color=colours[row.name],
                    label=row.name,
                )
    if summary.target is not None:
        right.axhline(
            summary.target,
            color="#444",
            ls=":",
            lw=1,
            label=f"target ({summary.target_fraction:g} x {summary.reference})",
        )
    left.set_title("training loss")
    right.set_title(f"validation {summary.metric}")
    for axis in (left, right):
        axis.set_xlabel("optimizer step")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    return _png(figure)


def _mean_curve(curves_of_seeds: list[list[list[float]]], column: int) -> tuple[list[float], list[float]]:
    """The steps every seed logged, with the mean value there."""
    if not curves_of_seeds:
        return [], []
    common = set.intersection(*({row[0] for row in curve} for curve in curves_of_seeds))
    steps = sorted(common)
    by_seed = [{row[0]: row[column] for row in curve} for curve in curves_of_seeds]
    return steps, [statistics.mean(seed[s] for seed in by_seed) for s in steps]


def _seeds(summary: Summary) -> str:
    counts = sorted({r.finished for r in summary.rows if r.finished})
    return f"{'/'.join(map(str, counts)) or 0} seed(s) per method"


def _forgetting_measure(summary: Summary) -> str:
    return next((r.forgetting_measure for r in summary.rows if r.forgetting_measure), "n/a")


def tuning(summary: Summary, outcomes: dict[str, dict[str, Any]]) -> bytes:
    """Validation metric against learning rate per tuned run (other searched fields at their chosen
    values), the chosen candidate ringed."""
    plt = _pyplot()
    colours = colour_of(summary)
    figure, axis = plt.subplots(figsize=(7.5, 4.2))
    for name, outcome in outcomes.items():
        chosen = outcome.get("chosen") or {}
        others = {k: v for k, v in chosen.items() if k != "train.lr"}
        points = sorted(
            (row["candidate"]["train.lr"], row["validation"])
            for row in outcome["candidates"]
            if "train.lr" in row["candidate"]
            and row["validation"] is not None
            and all(row["candidate"].get(k) == v for k, v in others.items())
        )
        if not points:
            continue
        colour = colours.get(name, COLOURS[len(colours) % len(COLOURS)])
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=4, color=colour, label=name)
        if "train.lr" in chosen:
            axis.scatter(
                [chosen["train.lr"]],
                [outcome["chosen_validation"]],
                s=110,
                facecolors="none",
                edgecolors=colour,
                linewidths=1.6,
            )
    axis.set_xscale("log")
    axis.set_xlabel("learning rate")
    axis.set_ylabel(f"best validation {summary.metric}")
    axis.set_title("Learning-rate search (ringed: chosen, then trained with the test seeds)")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    return _png(figure)


def all_figures(
    summary: Summary, records: Sequence[dict[str, Any]], outcomes: dict[str, dict[str, Any]] | None = None
) -> dict[str, bytes]:
    """Every figure of the report by file stem."""
    figures = {
        "quality-vs-parameters": quality_vs_parameters(summary),
        "costs": costs(summary),
        "curves": curves(summary, records),
        "latency": latency(summary),
    }
    if outcomes:
        figures["tuning"] = tuning(summary, outcomes)
    return figures


__all__ = ["MethodSummary", "all_figures"]

"""Explaining a selection: a Markdown table, a per-layer figure, and the full record as JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from . import init
from .choose import Selection

RECORD = "selection.json"
TABLE = "selection.md"
FIGURE = "selection.png"


def record(selection: Selection) -> dict[str, Any]:
    """Everything the choice was made from, JSON-ready."""
    a, scores = selection.allocation, selection.scores
    gains = scores.rank_gains if scores else {}
    return {
        "rule": selection.rule,
        "budget": a.budget,
        "used": a.used,
        "total_params": selection.candidates.total_params,
        "always_trained": selection.candidates.always_trained,
        "adapter": selection.adapter,
        "low_rank": [
            {
                "module": c.name,
                "kind": c.kind,
                "shape": [c.rows, c.cols],
                "cost_per_rank": c.cost_per_rank,
                "rank": a.ranks.get(c.name, 0),
                "gains": gains.get(c.name, []),
            }
            for c in selection.candidates.low_rank
        ],
        "whole": [
            {
                "name": w.name,
                "kind": w.kind,
                "params": sum(w.params.values()),
                "chosen": w.name in a.whole,
                "gain": sum(scores.param_gains.get(n, 0.0) for n in w.params) if scores else None,
            }
            for w in selection.candidates.whole
        ],
        "probe": vars(scores.cost) if scores and scores.cost else None,
        "init": "gradient directions" if selection.init else "random (LoRA's own)",
    }


def markdown(selection: Selection) -> str:
    """The choice as a readable table: every candidate, its score, and what it got."""
    rec = record(selection)
    a = selection.allocation
    total = rec["total_params"]
    lines = [
        f"# Selection ({rec['rule']} score)",
        "",
        f"Budget **{a.budget:,}** trainable parameters ({100 * a.budget / total:.3f}% of {total:,}); used "
        f"**{a.used:,}** ({100 * a.used / max(a.budget, 1):.1f}% of the budget). "
        + (
            f"Also trained in full, outside the budget: {', '.join(rec['always_trained'])}. "
            if rec["always_trained"]
            else ""
        ),
    ]
    probe = rec["probe"]
    if probe:
        lines.append(
            f"Probe: {probe['batches']} batches, {probe['forward_backward_passes']} forward/backward passes, "
            f"{probe['seconds']:.1f} s, {probe['stats_bytes'] / 2**20:.1f} MiB of statistics."
        )
    lines.append(
        "Initialisation: each chosen module's LoRA A starts along the probed gradient's best input "
        f"directions, B at zero ({init.INIT_FILE})."
        if selection.init
        else "Initialisation: LoRA's own (random A, zero B)."
    )
    explain = {
        "gradient": "score = squared singular values of the mean gradient: what each rank can lower the loss by, "
        "to first order",
        "adam": "score = singular values of the mean gradient times the L1 norm of their output direction: what "
        "each rank can lower the loss by under AdamW's equal-size steps, to first order",
        "fisher": "score = eigenvalues of the per-batch gradient second moment (empirical Fisher, projected to rank k)",
        "activation": "score = eigenvalues of the module's output second moment (label-free)",
        "random": "modules drawn at random (a control, not a score)",
    }
    lines += [
        "",
        explain[rec["rule"]] + ". A module's 'captured' is the share of its score its chosen rank "
        "takes; ranks go where a parameter buys the most score.",
        "",
    ]
    lines += [
        "| module | kind | weight | score (rank 1) | captured | rank | params |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rec["low_rank"]:
        gains, rank = row["gains"], row["rank"]
        whole = sum(gains)
        captured = f"{100 * sum(gains[:rank]) / whole:.0f}%" if whole > 0 and rank else "-"
        first = f"{gains[0]:.3g}" if gains else "-"
        lines.append(
            f"| {row['module']} | {row['kind']} | {row['shape'][0]}x{row['shape'][1]} | {first} | {captured} "
            f"| {rank or '-'} | {rank * row['cost_per_rank']:,} |"
        )
    if rec["whole"]:
        lines += ["", "| whole parameters | kind | params | score | chosen |", "|---|---|---|---|---|"]
        for row in rec["whole"]:
            gain = "-" if row["gain"] is None else f"{row['gain']:.3g}"
            lines.append(
                f"| {row['name']} | {row['kind']} | {row['params']:,} | {gain} | {'yes' if row['chosen'] else 'no'} |"
            )
    return "\n".join(lines) + "\n"


def figure(selection: Selection) -> bytes:
    """Per module, in model order: its score at rank 1 (log scale) and the rank it got."""
    from ..report.plots import _png, _pyplot

    plt = _pyplot()
    rec = record(selection)
    rows = rec["low_rank"]
    xs = range(len(rows))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(7.0, 0.18 * len(rows) + 2), 5.6), sharex=True)
    firsts = [r["gains"][0] if r["gains"] and r["gains"][0] > 0 else float("nan") for r in rows]
    colours = ["#4c72b0" if r["rank"] else "#bbbbbb" for r in rows]
    top.bar(xs, firsts, color=colours)
    if any(v == v for v in firsts):
        top.set_yscale("log")
    top.set_ylabel("score at rank 1")
    top.set_title(f"{rec['rule']} score per module (blue: chosen) and the ranks given")
    bottom.bar(xs, [r["rank"] for r in rows], color="#dd8452")
    bottom.set_ylabel("chosen rank")
    step = max(1, len(rows) // 40)
    bottom.set_xticks(list(xs)[::step])
    bottom.set_xticklabels([r["module"] for r in rows][::step], rotation=90, fontsize=6)
    return _png(fig)


def write(selection: Selection, directory: str | os.PathLike) -> Path:
    """Write ``selection.json``, ``selection.md`` and ``selection.png`` into ``directory``, and the chosen
    modules' initial LoRA directions as ``init.safetensors`` when there are any."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if selection.init:
        init.save(selection.init, directory / init.INIT_FILE)
    (directory / RECORD).write_text(json.dumps(record(selection), indent=1) + "\n", encoding="utf-8")
    (directory / TABLE).write_text(markdown(selection), encoding="utf-8")
    (directory / FIGURE).write_bytes(figure(selection))
    return directory

"""The comparison's Markdown summary and self-contained HTML report (figures embedded as data URIs)."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .summary import MethodSummary, Stat, Summary, summarise, test_metric

COLUMNS = [
    "method",
    "test {metric}",
    "trainable params",
    "adapter / model file",
    "peak train memory (MB)",
    "train time (s)",
    "throughput (ex/s)",
    "time to target (s)",
    "latency base (ms)",
    "latency unmerged (ms)",
    "latency merged (ms)",
    "forgetting",
]


def stat(value: Stat, digits: int = 3, unit: str = "", scale: float = 1.0) -> str:
    """``mean ± sd`` (``n/a`` when not measured)."""
    if value.mean is None:
        return "n/a"
    text = f"{value.mean * scale:.{digits}f}"
    if value.n > 1:
        text += f" ± {value.sd * scale:.{digits}f}"
    return text + unit


def count(n: int | None) -> str:
    if n is None:
        return "n/a"
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= limit:
            return f"{n / limit:.3g}{suffix}"
    return str(n)


def size(n: int | None) -> str:
    if n is None:
        return "n/a"
    for limit, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= limit:
            return f"{n / limit:.3g} {suffix}"
    return f"{n} B"


def cells(row: MethodSummary, summary: Summary) -> list[str]:
    """The row's table cells, the same strings in the Markdown and the HTML."""
    name = row.name + (" ◆" if row.pareto else "")
    metric = stat(row.metric, 4)
    if row.finished < row.seeds:
        metric += f" ({row.finished}/{row.seeds} seeds)"
    percent = f" ({row.trainable_percent:.3g}%)" if row.trainable_percent is not None else ""
    if summary.target is None or not row.finished:
        target = "n/a"
    elif row.target_reached:
        target = stat(row.time_to_target, 1) + (
            f" ({row.target_reached}/{row.finished})" if row.target_reached < row.finished else ""
        )
    else:
        target = "not reached"
    latency = [stat(s, 1) for s in (row.latency_base_ms, row.latency_unmerged_ms, row.latency_merged_ms)]
    return [
        name,
        metric,
        count(row.trainable_params) + percent,
        size(row.artifact_bytes),
        stat(row.peak_memory_mb, 0),
        stat(row.train_seconds, 1),
        stat(row.examples_per_s, 1),
        target,
        *latency,
        stat(row.forgetting, 3),
    ]


def baseline_cells(summary: Summary) -> list[str] | None:
    """The floor's row (a classifier's majority class): its metric, nothing trained, nothing measured."""
    if summary.baseline is None:
        return None
    return [f"({summary.baseline_name})", f"{summary.baseline:.4f}", "0", *["-"] * (len(COLUMNS) - 3)]


def table_rows(summary: Summary) -> list[list[str]]:
    rows = [cells(row, summary) for row in summary.rows]
    floor = baseline_cells(summary)
    return rows + ([floor] if floor else [])


def markdown(summary: Summary) -> str:
    """The summary table in Markdown, with a legend of what each column measures."""
    header = [c.format(metric=summary.metric) for c in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in table_rows(summary)]
    return "\n".join(lines) + "\n\n" + legend(summary) + "\n"


def legend(summary: Summary) -> str:
    target = (
        f"first validation {summary.metric} at or beyond {summary.target:.4g} = {summary.target_fraction:g} x the "
        f"best of `{summary.reference}`, in seconds of training"
        if summary.target is not None
        else "n/a"
    )
    measure = next((r.forgetting_measure for r in summary.rows if r.forgetting_measure), None)
    forgetting = (
        f"{measure} on {summary.forgetting_source}; 0 = unchanged, higher = moved further"
        if measure
        else "not measured"
    )
    floor = (
        f" ({summary.baseline_name}) = what always predicting the training split's most frequent class "
        f"scores; a row must beat it by more than its spread over seeds to be marked ◆."
        if summary.baseline is not None
        else ""
    )
    spread = ""
    if summary.latency_spread is not None and summary.latency_spread > 0.05:
        spread = (
            f" The base model's latency, the same model in every run, ranged over "
            f"{100 * summary.latency_spread:.0f}% between runs: latency differences smaller than that are noise."
        )
    return "\n".join(
        [
            f"Mean ± sd over seeds. ◆ = on the Pareto front of test {summary.metric} against trainable parameters.{floor}",
            "Peak train memory: the training process's peak resident memory (CPU) or peak allocated memory (GPU).",
            "Throughput: training examples per second of the optimizer steps alone; train time also counts evaluation.",
            f"Time to target: {target}.",
            "Latency: ms per forward pass on one evaluation batch (median); merged is n/a where a method cannot merge."
            + spread,
            f"Forgetting: {forgetting}.",
        ]
    )


def write_report(
    output_dir: Path,
    records: Sequence[dict[str, Any]],
    config: Any = None,
    *,
    outcomes: dict[str, dict[str, Any]] | None = None,
    baseline: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and the figures (``figures/*.png``) into ``output_dir``.

    Args:
        output_dir: Where the report goes.
        records: The runs' records.
        config: The comparison (run order, target settings), when known.
        outcomes: Learning-rate searches by run name (``peftkit.compare.tune``), for the Tuning table.
        baseline: The task's floor (a classifier's majority class), for its row and the Pareto mark.
    """
    from .plots import all_figures

    names = getattr(config, "names", None) or list(dict.fromkeys(r.get("name") for r in records))
    records = sorted(
        records,
        key=lambda r: (
            names.index(r.get("name")) if r.get("name") in names else len(names),
            r.get("seed", 0),
        ),
    )
    summary = summarise(
        records,
        names,
        target_fraction=getattr(config, "target_fraction", 0.95),
        reference=getattr(config, "reference", "full"),
        baseline=baseline,
    )
    outcomes = {n: o for n, o in (outcomes or {}).items() if n in names}
    figures = all_figures(summary, records, outcomes)
    figure_dir = output_dir / "figures"
    figure_dir.mkdir(parents=True, exist_ok=True)
    for stem, png in figures.items():
        (figure_dir / f"{stem}.png").write_bytes(png)
    md = output_dir / "report.md"
    md.write_text(
        f"# {_title(summary)}\n\n{markdown(summary)}\n"
        + tuning_markdown(outcomes, summary.metric)
        + "".join(f"![{stem}](figures/{stem}.png)\n\n" for stem in figures)
    )
    page = output_dir / "report.html"
    page.write_text(html_page(summary, records, figures, outcomes))
    (output_dir / "summary.json").write_text(json.dumps(_summary_json(summary), indent=1, default=str) + "\n")
    return {"markdown": md, "html": page, "figures": figure_dir}


def tuning_rows(outcomes: dict[str, dict[str, Any]]) -> list[list[str]]:
    """One row per tuned run: the candidates with their validation metric, the choice, the search's cost."""
    rows = []
    for name, outcome in outcomes.items():
        tried = ", ".join(
            f"{r.get('label') or r['candidate']}: "
            + (f"{r['validation']:.4f}" if r["validation"] is not None else "/".join(r["status"]))
            for r in outcome["candidates"]
        )
        chosen = (
            outcome.get("chosen_label") or str(outcome["chosen"])
            if outcome.get("chosen")
            else "none (kept the configured values)"
        )
        if outcome.get("edge"):  # the best may lie beyond the candidates: say so rather than imply an optimum
            chosen += f" ({outcome['edge']} tried)"
        rows.append(
            [
                name,
                tried,
                chosen,
                f"{outcome['trials']} x {outcome.get('steps')} steps, seeds "
                f"{', '.join(map(str, outcome.get('seeds', [])))}",
                f"{outcome['seconds']:.0f}",
            ]
        )
    return rows


TUNING_COLUMNS = ["run", "validation {metric} per candidate", "chosen", "trials", "search cost (s)"]


def tuning_markdown(outcomes: dict[str, dict[str, Any]], metric: str) -> str:
    """The tuning table in Markdown (empty when nothing was tuned)."""
    if not outcomes:
        return ""
    header = [c.format(metric=metric) for c in TUNING_COLUMNS]
    lines = [
        "## Tuning",
        "",
        "Each tuned run trained once per candidate on search seeds of its own; the best mean "
        f"validation {metric} chose the value the test seeds then trained with.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in tuning_rows(outcomes)]
    total = sum(o["seconds"] for o in outcomes.values())
    return "\n".join(lines) + f"\n\nThe search cost {total:.0f} s of wall time in all.\n\n"


def _title(summary: Summary) -> str:
    if any(row.method == "full" for row in summary.rows):
        return f"PEFT against full fine-tuning: {summary.task} with {summary.model}"
    return f"PEFT methods compared: {summary.task} with {summary.model}"


def _summary_json(summary: Summary) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(summary)


CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2rem auto; max-width: 1280px;
       color: #222; line-height: 1.45; padding: 0 1rem; }
h1 { font-size: 1.55rem; margin-bottom: .2rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
.meta { color: #555; font-size: .9rem; }
table { border-collapse: collapse; font-size: .78rem; margin: .6rem 0; }
.wide { overflow-x: auto; }
th, td { border: 1px solid #d5d5d5; padding: .3rem .4rem; text-align: right; white-space: nowrap; }
th { background: #f3f4f6; white-space: normal; vertical-align: bottom; } td:first-child, th:first-child { text-align: left; }
tr.front td:first-child { font-weight: 600; } tr.floor td { color: #666; font-style: italic; }
.legend { font-size: .82rem; color: #444; } .legend p { margin: .15rem 0; }
img { max-width: 100%; border: 1px solid #eee; margin: .5rem 0; }
code { background: #f3f4f6; padding: 0 .25rem; border-radius: 3px; }
.bad { color: #b00020; }
"""


def html_page(
    summary: Summary,
    records: Sequence[dict[str, Any]],
    figures: dict[str, bytes],
    outcomes: dict[str, dict[str, Any]] | None = None,
) -> str:
    """The whole report as one HTML file: no external files, scripts or fonts."""
    esc = html.escape
    tuning = ""
    if outcomes:
        head = "".join(f"<th>{esc(c.format(metric=summary.metric))}</th>" for c in TUNING_COLUMNS)
        rows = "".join(
            "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in tuning_rows(outcomes)
        )
        total = sum(o["seconds"] for o in outcomes.values())
        tuning = (
            f"<h2>Tuning</h2><p class='legend'>Each tuned run trained once per candidate on search seeds of its "
            f"own; the best mean validation {esc(summary.metric)} chose the value the test seeds then trained "
            f"with. The search cost {total:.0f} s in all.</p><div class='wide'><table><thead><tr>{head}</tr>"
            f"</thead><tbody>{rows}</tbody></table></div>"
        )
    header = "".join(f"<th>{esc(c.format(metric=summary.metric))}</th>" for c in COLUMNS)
    body = "".join(
        f"<tr class='{'front' if row.pareto else ''}'>"
        + "".join(f"<td>{esc(c)}</td>" for c in cells(row, summary))
        + "</tr>"
        for row in summary.rows
    )
    floor = baseline_cells(summary)
    if floor:
        body += "<tr class='floor'>" + "".join(f"<td>{esc(c)}</td>" for c in floor) + "</tr>"
    legend_html = "".join(f"<p>{esc(line)}</p>" for line in legend(summary).splitlines())
    images = "".join(
        f"<h2>{esc(title)}</h2><img alt='{esc(stem)}' src='data:image/png;base64,{base64.b64encode(figures[stem]).decode()}'>"
        for stem, title in (
            ("quality-vs-parameters", "Quality against trainable parameters"),
            ("costs", "Memory, time and forgetting"),
            ("curves", "Training and validation curves"),
            ("latency", "Inference latency"),
            ("tuning", "Learning-rate search"),
        )
        if stem in figures
    )
    notes = [f"<li><b>{esc(row.name)}</b>: {esc(note)}</li>" for row in summary.rows for note in row.notes]
    first = next((r for r in records if r.get("versions")), {})
    versions = ", ".join(f"{k} {v}" for k, v in (first.get("versions") or {}).items())
    machine = first.get("machine") or {}
    where = f"{machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, {machine.get('torch_threads', '?')} torch threads"
    if machine.get("gpu"):
        where += f", {machine['gpu']}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(_title(summary))}</title><style>{CSS}</style></head>
<body>
<h1>{esc(_title(summary))}</h1>
<p class="meta">{len(records)} runs · {esc(versions)} · {esc(where)}</p>
<h2>Summary</h2>
<div class="wide"><table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table></div>
<div class="legend">{legend_html}</div>
{tuning}
{images}
<h2>Every run</h2>
{_runs_table(records)}
{"<h2>Notes</h2><ul>" + "".join(notes) + "</ul>" if notes else ""}
</body></html>
"""


def _runs_table(records: Sequence[dict[str, Any]]) -> str:
    esc = html.escape
    rows = []
    for r in records:
        value = test_metric(r)
        status = r.get("status", "?")
        rows.append(
            "<tr>"
            + "".join(
                f"<td>{esc(str(c))}</td>"
                for c in (
                    r.get("name"),
                    r.get("seed"),
                    f"<{status}>" if status not in ("completed", "early_stopped") else status,
                    f"{value:.4f}" if value is not None else "n/a",
                    f"{r['best_validation']:.4f}" if isinstance(r.get("best_validation"), float) else "n/a",
                    r.get("best_step", "n/a"),
                    r.get("steps", "n/a"),
                    f"{r['train_seconds']:.1f}" if isinstance(r.get("train_seconds"), float) else "n/a",
                    f"{r['peak_memory_mb']:.0f}" if isinstance(r.get("peak_memory_mb"), float) else "n/a",
                    r.get("finished_at", ""),
                )
            )
            + "</tr>"
        )
    head = "".join(
        f"<th>{h}</th>"
        for h in (
            "run",
            "seed",
            "status",
            "test",
            "best validation",
            "best step",
            "steps",
            "train s",
            "peak MB",
            "finished",
        )
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"

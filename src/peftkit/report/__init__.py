"""Comparison reports: one summary row per method from the run records, a Markdown table, an HTML page
with embedded matplotlib figures (``peftkit compare`` writes them; ``peftkit report DIR`` rewrites them)."""

from .render import markdown, write_report
from .summary import MethodSummary, Stat, Summary, pareto_front, summarise, time_to_target

__all__ = [
    "MethodSummary",
    "Stat",
    "Summary",
    "markdown",
    "pareto_front",
    "summarise",
    "time_to_target",
    "write_report",
]

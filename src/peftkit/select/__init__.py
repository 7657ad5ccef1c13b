"""Choosing what to tune: importance scores from a short probe, and a budgeted allocation of LoRA
targets, per-module ranks and whole parameters (``peftkit select``, ``adapter.target_modules: auto``).
See docs/select.md."""

from . import init
from .allocate import Allocation, allocate, random_allocation
from .candidates import Candidates, LowRank, WholeParams, find_candidates
from .choose import INITS, RULES, Selection, adapter_section, is_auto, parse_budget, select
from .run import select_for_run
from .scores import SCORES, Scores, probe

__all__ = [
    "Allocation",
    "Candidates",
    "INITS",
    "LowRank",
    "RULES",
    "SCORES",
    "Scores",
    "Selection",
    "WholeParams",
    "adapter_section",
    "allocate",
    "find_candidates",
    "init",
    "is_auto",
    "parse_budget",
    "probe",
    "random_allocation",
    "select",
    "select_for_run",
]

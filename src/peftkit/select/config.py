"""The ``select:`` section of a run config: automatic choice of targets and ranks (``peftkit select``,
``adapter.target_modules: auto``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SelectConfig:
    """Automatic selection of LoRA targets and ranks (used when ``adapter.target_modules: auto``).

    Attributes:
        budget: Trainable parameters to spend: a share of the base model such as "0.5%", or a count
            such as 82944 or "83k". Modules the run trains anyway (a fresh head) are not counted.
        score: "gradient", "adam", "fisher", "activation" (see docs/select.md), or "random" (a control).
        probe_batches: Training batches the probe runs forward and backward (the probe's whole cost).
        probe_batch_size: Examples per probe batch (None: train.batch_size).
        min_rank: Lowest rank a chosen module gets.
        max_rank: Highest rank any module gets.
        whole_params: Also consider training normalisation layers, biases and small heads in full (off by
            default: see docs/select.md for what they cost in the experiment).
        embeddings: Also consider LoRA on embedding tables (off by default, likewise).
        seed: Seed of the probe's batches and of the random control (None: train.seed).
        init: "gradient": each chosen module's LoRA A starts along the probed gradient's best input
            directions, B at zero (scores gradient and adam); "random": LoRA's own init.
        init_from: A file of such directions (the init.safetensors that ``peftkit select`` writes beside
            selected.yaml), applied after the adapter is built; for a run that does not select itself.
    """

    budget: str | int | None = None
    score: str = "gradient"
    probe_batches: int = 8
    probe_batch_size: int | None = None
    min_rank: int = 1
    max_rank: int = 64
    whole_params: bool = False
    embeddings: bool = False
    seed: int | None = None
    init: str = "gradient"
    init_from: str | None = None


def select_problems(select: SelectConfig) -> list[str]:
    """Every problem of the ``select`` section's own values (how it combines with ``adapter`` is the run
    config's rule), each headed by its field path."""
    from .choose import INITS, RULES, parse_budget

    sel = select
    problems = []
    if sel.budget is not None:
        try:
            parse_budget(sel.budget, 1)
        except ValueError as exc:
            problems.append(f"select.budget: {exc}")
    if sel.score not in RULES:
        problems.append(f"select.score: expected one of {', '.join(RULES)}, got {sel.score!r}")
    if sel.probe_batches < 1:
        problems.append(
            f"select.probe_batches: expected a positive number of batches, got {sel.probe_batches}"
        )
    if sel.probe_batch_size is not None and sel.probe_batch_size < 1:
        problems.append(
            f"select.probe_batch_size: expected a positive number of examples, got {sel.probe_batch_size}"
        )
    if not 1 <= sel.min_rank <= sel.max_rank:
        problems.append(
            f"select.min_rank, select.max_rank: need 1 <= min_rank <= max_rank, got {sel.min_rank} "
            f"and {sel.max_rank}"
        )
    if sel.init not in INITS:
        problems.append(f"select.init: expected one of {', '.join(INITS)}, got {sel.init!r}")
    return problems

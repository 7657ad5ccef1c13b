"""The sections of a run config that tasks read beside the model and the data: ``eval:`` (how
evaluation runs) and ``generation:`` (how the generation tasks decode), with their rules; each problem
is headed by its field path. Which metrics exist is each task's own check, when it is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..data.config import SPLITS


@dataclass
class EvalConfig:
    """How evaluation and prediction run.

    Attributes:
        batch_size: Examples per forward pass.
        split: The split ``peftkit eval`` reports by default ("test" or "validation").
        max_new_tokens: The older spelling of ``generation.max_new_tokens``, still read (None: unset).
        metrics: Metric names to report (the task's defaults when empty).
        before_training: ``peftkit train`` also evaluates the test split before training (the base
            model: adapters disabled), so ``metrics.json`` holds the metric before and after.
    """

    batch_size: int = 32
    split: str = "test"
    max_new_tokens: int | None = None
    metrics: list[str] = field(default_factory=list)
    before_training: bool = False


@dataclass
class GenerationSettings:
    """How generation tasks decode, in ``predict``, ``chat`` and evaluation (a transformers
    ``GenerationConfig``). Greedy by default, so evaluations are deterministic.

    Attributes:
        max_new_tokens: Tokens generated per answer at most.
        do_sample: Sample instead of choosing the likeliest token; None samples exactly when
            ``temperature`` (above 0), ``top_p`` or ``top_k`` is set.
        temperature: Sampling temperature (0 or None: greedy).
        top_p: Nucleus sampling: keep the likeliest tokens whose probabilities add up to this.
        top_k: Sample among the ``top_k`` likeliest tokens only.
        num_beams: Beam search width (1: no beam search).
        repetition_penalty: Above 1 discourages repeating tokens (1: off).
        seed: Seed of the sampling generator, so a sampled evaluation can be repeated.
    """

    max_new_tokens: int = 32
    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    num_beams: int = 1
    repetition_penalty: float = 1.0
    seed: int = 0


def eval_problems(eval: EvalConfig) -> list[str]:
    """Every problem of the ``eval`` section's values."""
    checks = [
        ("batch_size", eval.batch_size > 0, "a positive number of examples"),
        ("split", eval.split in SPLITS, f"one of {', '.join(SPLITS)}"),
        (
            "max_new_tokens",
            eval.max_new_tokens is None or eval.max_new_tokens > 0,
            "a positive number of tokens, or null",
        ),
    ]
    return [
        f"eval.{name}: expected {expected}, got {getattr(eval, name)!r}"
        for name, ok, expected in checks
        if not ok
    ]


def generation_problems(generation: GenerationSettings) -> list[str]:
    """Every problem of the ``generation`` section's values."""
    g = generation
    checks = [
        ("max_new_tokens", g.max_new_tokens > 0, "a positive number of tokens"),
        (
            "temperature",
            g.temperature is None or g.temperature >= 0,
            "a non-negative temperature (0: greedy), or null",
        ),
        ("top_p", g.top_p is None or 0 < g.top_p <= 1, "a probability mass in (0, 1], or null"),
        ("top_k", g.top_k is None or g.top_k > 0, "a positive number of tokens, or null"),
        ("num_beams", g.num_beams >= 1, "a beam width of 1 or more (1: no beam search)"),
        ("repetition_penalty", g.repetition_penalty > 0, "a positive penalty (1: off)"),
    ]
    return [
        f"generation.{name}: expected {expected}, got {getattr(g, name)!r}"
        for name, ok, expected in checks
        if not ok
    ]

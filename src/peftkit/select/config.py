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

"""The whole run config (``peftkit train CONFIG.yaml``): :class:`RunConfig` composes the sections, each
of which lives with the package that reads it.

Every YAML key maps to a dataclass field; ``run/config.py`` loads and validates a file against these
classes and reports every problem at once with its field path (``train.lr: ...``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..core.registry import DEFAULT_METHOD
from ..data.config import DataConfig, SplitConfig
from ..models.config import ModelConfig
from ..select.config import SelectConfig
from ..tasks.config import EvalConfig, GenerationSettings
from ..train.config import TrainConfig

# The sections are re-exported here because users (and docs/task-*.md until this change) import them
# from peftkit.run.schema; peftkit's own code imports each from its owner.
__all__ = [
    "DataConfig",
    "EvalConfig",
    "GenerationSettings",
    "ModelConfig",
    "RunConfig",
    "SelectConfig",
    "SplitConfig",
    "TrainConfig",
]


@dataclass
class RunConfig:
    """A whole run: ``task``, ``model``, ``data``, ``adapter``, ``train``, ``eval`` and where results go.

    ``adapter`` holds ``method`` (a name for :func:`peftkit.make_config`, default
    :data:`~peftkit.core.registry.DEFAULT_METHOD`) and that
    method's config fields, e.g. ``{"method": "lora", "r": 8, "target_modules": ["query", "value"]}``;
    ``method: full`` fine-tunes every parameter instead (the baseline PEFT is compared with).
    """

    task: str = "text-classification"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: dict[str, Any] = field(default_factory=lambda: {"method": DEFAULT_METHOD})
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    select: SelectConfig = field(default_factory=SelectConfig)
    output_dir: str = "runs/run"

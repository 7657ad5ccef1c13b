"""Load a YAML run config (plus ``dotted.key=value`` overrides) into a checked :class:`RunConfig`.

Every key is checked against the section dataclasses (``run/loader.py`` does the typing): an unknown
key (with the closest valid name), a value of the wrong type, an out-of-range value, an unknown task,
method, bundled model or data set, and a missing file are all collected and raised together as one
:class:`~peftkit.errors.ConfigError`, each problem headed by its field path (``train.lr: ...``). Each
section's own rules live with its owner (``data_problems`` in ``data/config.py``, ...); the ``adapter``
section is checked by the chosen method's config class (``run/adapter.py``). What is left here are the
rules that join sections (a method that cannot train on a quantized base, a chat template on a task that
reads none) and the train section's ranges.

:func:`dump_config` writes the resolved config (every default filled in, local paths made absolute)
back to YAML; a run keeps it as ``config.yaml`` in its directory, so ``peftkit eval RUN_DIR`` can
rebuild the run from anywhere.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from ..backends.config import quantize_problems
from ..core.registry import FULL_FINE_TUNING, find_method, methods_with
from ..data.config import SPLITS, DataConfig, data_problems, data_source_problems
from ..errors import ConfigError
from ..models.config import ModelConfig, model_problems, model_source_problems
from ..select.choose import AUTO
from ..select.config import select_problems
from ..tasks.config import EvalConfig, eval_problems, generation_problems
from ..train.config import TrainConfig, train_problems
from .adapter import (
    FULL_FINE_TUNING_LR_CANDIDATES,
    adapter_problems,
    check_adapter,
    lr_candidates,
    method_name,
)
from .loader import apply_overrides, load_dataclass, parse_yaml, show
from .schema import RunConfig
from .tokens import token_problems

# -- loading ---------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> RunConfig:
    """Read the YAML file ``path``, apply ``overrides`` and return the checked run config.

    Args:
        path: A YAML file whose top-level keys are the sections of :class:`RunConfig`.
        overrides: ``dotted.key=value`` strings applied on top of the file, e.g. ``train.lr=1e-3``,
            ``adapter.target_modules=[query,value]``; values are read as YAML.

    Raises:
        ConfigError: the file is missing or not YAML, or any field is wrong (every problem is listed).
    """
    path = Path(path)
    if not path.is_file():
        why = "is a directory, not a YAML file" if path.is_dir() else "does not exist"
        raise ConfigError(
            [
                f"config file {str(path)!r} {why} (relative paths start from {str(Path.cwd())!r}); "
                "give the path of a YAML run config, e.g. one of configs/*.yaml"
            ],
            what="run config",
        )
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {exc}"], what="run config") from None
    return parse_config({} if data is None else data, overrides, source=str(path))


def parse_config(data: Any, overrides: Iterable[str] = (), source: str = "config") -> RunConfig:
    """Check the mapping ``data`` (a parsed YAML document) with ``overrides`` applied.

    Raises:
        ConfigError: every problem found, each headed by its field path.
    """
    problems: list[str] = []
    if not isinstance(data, Mapping):
        raise ConfigError(
            [
                f"{source}: the top level must be a mapping of sections (task, model, data, adapter, train, "
                f"eval, output_dir), got {show(data)}"
            ],
            what="run config",
        )
    try:
        # the older spelling moves into its section twice: from the file, then from the overrides, so an
        # override (on either spelling) is the newest word on the length
        data = apply_overrides(_moved_max_new_tokens(data, problems), overrides, problems)
        data = _moved_max_new_tokens(data, problems, overriding=True)
    except RecursionError:  # a YAML alias that contains itself (`a: &x [*x]`), or absurd nesting
        raise ConfigError(
            [
                f"{source}: a value refers to itself (a YAML alias used inside its own anchor) or is nested "
                "too deeply; a run config's sections are plain values, lists and mappings a few levels deep"
            ],
            what="run config",
        ) from None
    # Fields that failed their type check keep their defaults here, so the range and reference checks
    # still run on everything else and the user sees every problem in one go.
    config = load_dataclass(RunConfig, data, problems, custom={"adapter": check_adapter})
    reported = {p.split(":", 1)[0] for p in problems}
    problems += [
        p for p in value_problems(config) + reference_problems(config) if p.split(":", 1)[0] not in reported
    ]
    if problems:
        raise ConfigError(problems, what=f"run config {source!r}" if source != "config" else "run config")
    return config


def _moved_max_new_tokens(
    data: Mapping[str, Any], problems: list[str], overriding: bool = False
) -> dict[str, Any]:
    """``data`` with ``eval.max_new_tokens`` (the older spelling) moved to ``generation.max_new_tokens``;
    a file that gives both with different values is a problem (which one was meant?), an override
    (``overriding``) simply wins."""
    out = dict(data)
    section = out.get("eval")
    if not isinstance(section, Mapping) or section.get("max_new_tokens") is None:
        return out
    out["eval"] = {k: v for k, v in section.items() if k != "max_new_tokens"}
    generation = out.get("generation") if isinstance(out.get("generation"), Mapping) else {}
    given = generation.get("max_new_tokens")
    if given is not None and given != section["max_new_tokens"] and not overriding:
        problems.append(
            f"eval.max_new_tokens: {section['max_new_tokens']} disagrees with generation.max_new_tokens: "
            f"{given}; keep generation.max_new_tokens only (eval.max_new_tokens is its older spelling)"
        )
    out["generation"] = {**generation, "max_new_tokens": section["max_new_tokens"]}
    return out


# -- values ----------------------------------------------------------------------------------------


def value_problems(config: RunConfig) -> list[str]:
    """Every problem of the config's values, section by section, then of how the sections combine (the
    names that must exist are :func:`reference_problems`'s)."""
    problems = model_problems(config.model) + data_problems(config.data) + train_problems(config.train)
    problems += eval_problems(config.eval) + generation_problems(config.generation)
    if not config.output_dir.strip():
        problems.append(f"output_dir: expected a directory path, got {config.output_dir!r}")
    problems += quantize_problems(config.model.quantize, method_name(config.adapter))
    problems += select_problems(config.select) + _selection_problems(config)
    for name in ("system_prompt", "chat_template", "add_special_tokens"):
        if getattr(config.data, name) is not None and config.task != "causal-lm":
            problems.append(
                f"data.{name}: only causal-lm runs read it (this run's task is {config.task!r}); remove it"
            )
    return problems + token_problems(config.data.add_special_tokens, method_name(config.adapter))


def _selection_problems(config: RunConfig) -> list[str]:
    """How ``select`` combines with ``adapter``: a selecting run needs a budget; saved directions need a
    method that selection initialises, and a run that does not select itself."""
    sel = config.select
    auto = isinstance(config.adapter, dict) and config.adapter.get("target_modules") == AUTO
    problems = []
    if auto and sel.budget is None:
        problems.append(
            "select.budget: `adapter.target_modules: auto` needs a parameter budget, e.g. "
            "select: {budget: 0.5%} (a share of the base model) or select: {budget: 82944}"
        )
    if sel.init_from is None:
        return problems
    method, able = method_name(config.adapter), methods_with("selectable")
    init = config.adapter.get("init_lora_weights") if isinstance(config.adapter, dict) else None
    if isinstance(init, str) and init in getattr(_config_class(method), "data_inits", ()):
        problems.append(
            f"select.init_from: the saved gradient directions would overwrite the A that "
            f"init_lora_weights={init!r} computes; drop one of them"
        )
    elif auto:
        problems.append(
            "select.init_from: a run that selects (target_modules: auto) starts from its own "
            "probe's directions; drop select.init_from, or train the selected.yaml it belongs to"
        )
    elif method not in able:
        problems.append(
            f"select.init_from: the saved directions initialise the adapters selection chooses, so they "
            f"need adapter.method={' or '.join(able) or '(one that declares selectable)'}, got {method!r}"
        )
    elif not Path(sel.init_from).is_file():
        problems.append(
            f"select.init_from: {sel.init_from!r} does not exist; it is the init.safetensors that "
            "`peftkit select` writes beside selected.yaml (or set select.init_from: null)"
        )
    return problems


def _config_class(method: str) -> Any:
    try:
        return find_method(method).config_cls
    except KeyError:
        return None


def reference_problems(config: RunConfig) -> list[str]:
    """Names that must exist: the task, the bundled model or local path, the data set or files."""
    from ..tasks import registered_tasks, task_class

    problems: list[str] = []
    tasks = registered_tasks()
    if config.task not in tasks:
        close = difflib.get_close_matches(config.task.lower(), tasks, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        problems.append(
            f"task: unknown task {config.task!r}; {hint}registered tasks: {', '.join(tasks) or 'none'}"
        )
    else:
        task = task_class(config.task)
        train = config.train
        if (
            train.metric == getattr(task, "default_metric", None)
            and train.greater_is_better is not None
            and train.greater_is_better != task.greater_is_better
        ):
            better = "larger" if task.greater_is_better else "smaller"
            problems.append(
                f"train.greater_is_better: a {better} {train.metric} is better for task {config.task!r}; "
                f"set it to {str(task.greater_is_better).lower()}"
            )
    return problems + model_source_problems(config.model) + data_source_problems(config.data)


# -- writing ---------------------------------------------------------------------------------------


def resolved(config: RunConfig) -> RunConfig:
    """A copy of ``config`` whose local paths are absolute, so it runs from any working directory."""

    def absolute(path: str) -> str:
        return str(Path(path).expanduser().resolve())

    model, data = config.model, config.data
    name = model.name_or_path
    if name.lower() not in _bundled_models() and Path(name).expanduser().exists():
        model = dataclasses.replace(model, name_or_path=absolute(name))
    if isinstance(data.files, str):
        data = dataclasses.replace(data, files=absolute(data.files))
    elif isinstance(data.files, dict):
        data = dataclasses.replace(data, files={k: absolute(v) for k, v in data.files.items()})
    from ..data.chat import is_template_file

    if data.chat_template and is_template_file(data.chat_template):
        data = dataclasses.replace(data, chat_template=absolute(data.chat_template))
    select = config.select
    if select.init_from:
        select = dataclasses.replace(select, init_from=absolute(select.init_from))
    return dataclasses.replace(
        config, model=model, data=data, select=select, output_dir=absolute(config.output_dir)
    )


def with_padding(config: RunConfig, precision: str) -> RunConfig:
    """``config`` with ``data.pad_to_multiple_of: auto`` resolved for a run computing in ``precision``
    ("fp32" or "bf16", ``train.precision`` resolved): 8 when its matrix products run in bf16 or fp16
    (autocast, or a half-precision base), where each new sequence length costs compiled kernels
    (docs/performance.md, "bf16 on CPU") and tensor cores want multiples of 8; else 1. The resolved value
    is what the run directory's config.yaml keeps, so evaluating the run later pads as it trained."""
    if config.data.pad_to_multiple_of != "auto":
        return config
    half = precision == "bf16" or config.model.dtype in ("bfloat16", "float16")
    data = dataclasses.replace(config.data, pad_to_multiple_of=8 if half else 1)
    return dataclasses.replace(config, data=data)


def _bundled_models() -> list[str]:
    from ..models import bundled_models

    return bundled_models()


def to_dict(config: RunConfig) -> dict[str, Any]:
    """The config as plain YAML-ready data, sections in schema order."""
    return dataclasses.asdict(config)


def dump_config(config: RunConfig, path: str | os.PathLike | None = None) -> str:
    """The config as YAML (written to ``path`` too when given); :func:`load_config` reads it back."""
    text = yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=False, allow_unicode=True)
    if path is not None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(target.name + ".tmp")
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, target)  # atomic: a reader never sees half a config
    return text


# This module's own names, and names older code imports from here although they live elsewhere now
# (the sections with their owners, AUTO in select.choose, the adapter section's in run/adapter.py,
# apply_overrides and parse_yaml in run/loader.py).
__all__ = [
    "AUTO",
    "FULL_FINE_TUNING",
    "FULL_FINE_TUNING_LR_CANDIDATES",
    "SPLITS",
    "lr_candidates",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "adapter_problems",
    "apply_overrides",
    "dump_config",
    "load_config",
    "parse_config",
    "parse_yaml",
    "reference_problems",
    "resolved",
    "to_dict",
    "value_problems",
]

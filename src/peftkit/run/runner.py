"""The library functions behind ``peftkit train / eval / predict / merge``.

A run directory (``output_dir``) holds everything needed to use the result again::

    config.yaml      the resolved run config (defaults filled in, local paths absolute)
    metrics.json     test metrics of the best weights (and before training, when asked), best step,
                     steps, time, peak memory, trainable parameters, the data's provenance
    adapter/         the best adapter in the interchange format (``method: full``: ``model/``, the
                     trained parameters as a safetensors state dict)
    best/ final/ checkpoints/ metrics.jsonl tensorboard/    written by :func:`peftkit.train.fit.fit`

Each function builds the task from the registry (``Task(config)``), loads the model, injects the
adapter (or trains every parameter), and delegates the rest to the task and the training loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import api
from ..core.dropout import head_outside_base, set_base_dropout
from ..core.registry import DEFAULT_METHOD
from ..errors import ConfigError, FreshAdapterWarning
from ..models.config import base_dropout_mode
from ..select import init as select_init
from ..select import report as select_report
from ..select.choose import is_auto
from ..select.run import (
    choose_for_run,
    inject_from_data,
    require_selectable,
    select_for_run,
    start_from_directions,
)
from ..tasks import Task, task_class
from ..train.checkpoint import latest_checkpoint, load_weights, save_weights, seed_everything
from ..train.distributed import World, ensure_process_group
from ..train.fit import fit
from ..train.runtime import resolve_device, resolve_precision
from .config import (
    AUTO,
    FULL_FINE_TUNING,
    dump_config,
    load_config,
    resolved,
    to_dict,
    value_problems,
    with_padding,
)
from .schema import RunConfig
from .tokens import with_new_tokens

CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.json"
ADAPTER_DIR = "adapter"
FULL_MODEL_DIR = "model"
ADAPTER_NAME = "default"
SELECTION_DIR = "selection"  # what `adapter.target_modules: auto` chose, and why
TOKENIZER_MARKER = "tokenizer_config.json"  # a tokenizer saved beside the weights (data.add_special_tokens)

Log = Callable[[str], None]


@dataclass
class RunResult:
    """What :func:`train_run` produced.

    Attributes:
        run_dir: The run directory.
        metrics: The contents of ``metrics.json``.
        fit: The training loop's ``FitResult``.
    """

    run_dir: Path
    metrics: dict[str, Any]
    fit: Any

    @property
    def status(self) -> str:
        """ "completed", "early_stopped", "diverged" (non-finite loss) or "interrupted" (Ctrl-C)."""
        return str(self.metrics.get("status", "completed"))

    @property
    def ok(self) -> bool:
        """Training ended as planned, and the best weights were evaluated and saved."""
        return self.status in ("completed", "early_stopped")


@dataclass
class LoadedRun:
    """A run rebuilt from its directory: the config, the task and the trained model (in eval mode)."""

    config: RunConfig
    task: Task
    model: nn.Module
    weights: Path


def is_full_fine_tuning(config: RunConfig) -> bool:
    return str(config.adapter.get("method", DEFAULT_METHOD)).lower() == FULL_FINE_TUNING


def build_task(config: RunConfig) -> Task:
    """The registered task of ``config.task``, constructed with the sections it reads (``cls.sections``)."""
    try:
        cls = task_class(config.task)
    except KeyError as exc:
        raise ConfigError([f"task: {exc.args[0]}"], what="run config") from None
    return cls(**{section: getattr(config, section) for section in cls.sections})


def adapt(
    model: nn.Module,
    config: RunConfig,
    new_tokens: Sequence[int] = (),
    train_step: Callable[[], None] | None = None,
    task: Task | None = None,
    log: Log = print,
    facts: dict[str, Any] | None = None,
) -> nn.Module:
    """Inject the configured adapter, or make every parameter trainable (``method: full``).

    ``new_tokens``: ids of tokens added to the tokenizer (``data.add_special_tokens``), whose embedding rows
    the adapter trains as well (``run/tokens.py``). ``train_step``: forward and backward passes on a few
    training batches, for an init that starts from the loss's gradients (LoRA-GA). An init that starts from
    activations (LoRA's EVA, CorDA) reads ``task``'s training batches; what it found goes into
    ``facts["data_init"]``. Seed first (``seed_everything``) where the adapter's random initialisation must
    be reproducible.
    """
    if is_full_fine_tuning(config):
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    from ..errors import NoTargetMatchedError
    from ..models import portable_name

    fields = {k: v for k, v in config.adapter.items() if k != "method"}
    # the saved adapter_config.json names the base as others can find it, not as a path into .venv
    fields.setdefault("base_model_name_or_path", portable_name(config.model.name_or_path))
    adapter = api.make_config(config.adapter.get("method", DEFAULT_METHOD), **fields)
    if new_tokens:
        adapter = with_new_tokens(adapter, model, list(new_tokens))
    if adapter.needs_init_data():
        if train_step is None:
            raise ConfigError(
                [
                    "adapter: its init starts from the gradients of a few training batches (LoRA-GA), and none were "
                    "given: pass adapt(..., train_step=...), as `peftkit train` does, or choose another init"
                ],
                what="run config",
            )
        adapter.init_from_data(model, train_step)
    try:
        if not adapter.needs_data():
            return _inject_logging_start(model, adapter, log)
        if task is None:
            raise ConfigError(
                [
                    f"adapter.init_lora_weights: {adapter.init_lora_weights!r} starts from the run's training data; "
                    "adapt() needs the task (adapt(model, config, task=task))"
                ],
                what="run config",
            )
        found = inject_from_data(model, adapter, config, task, ADAPTER_NAME, log)
        if facts is not None:
            facts["data_init"] = found
        return model
    except NoTargetMatchedError as exc:
        # a config mistake (exit 2) named by its field, with the command that lists what there is
        message = str(exc).replace(
            "list them with model.named_modules().",
            f"list them with `peftkit inspect {config.model.name_or_path}`.",
        )
        field = "modules_to_save" if message.startswith("modules_to_save") else "target_modules"
        message = message.removeprefix("modules_to_save: ")
        raise ConfigError([f"adapter.{field}: {message}"], what="run config") from None


# -- train -----------------------------------------------------------------------------------------


def train_run(config: RunConfig, *, resume: bool = False, log: Log = print) -> RunResult:
    """Train, pick the best weights, evaluate them on the test split and save the run.

    Args:
        config: A checked run config (:func:`peftkit.run.config.load_config`).
        resume: Continue the run in ``config.output_dir`` from its latest checkpoint (from the start
            when the run was stopped before writing one).
        log: Where progress lines go.

    Returns:
        The run directory, its metrics and the training loop's result. When training diverged or was
        interrupted (``result.ok`` is False) the test evaluation and the adapter export are skipped;
        ``metrics.json`` records why, and an interrupted run continues with ``resume=True``.

    Raises:
        ConfigError: the task refuses the config, or ``output_dir`` already holds a run and
            ``resume`` is False.
    """
    config = resolved(config)
    run_dir = Path(config.output_dir)
    # Under torchrun every rank runs this function; rank 0 alone owns output_dir (fit follows its
    # run_dir and resume decisions on every rank), the others train beside it and write nothing.
    device = resolve_device(config.train.device)
    # a bad $PEFTKIT_AUTO_PRECISION stops here, before anything is written
    config = with_padding(config, resolve_precision(config.train.precision, device))
    world = ensure_process_group(device)
    if world.is_main:
        resume = _claim_run_dir(run_dir, config, resume, log)
    else:
        log = _silent
    task = build_task(config)
    model = task.load_model()
    base_dropout = _set_base_dropout(model, config, log)
    # before seeding: the probe must not shift the random numbers the adapter's init draws
    chosen = (
        choose_for_run(config, task, model, run_dir / SELECTION_DIR, resume, log, world)
        if is_auto(config.adapter)
        else None
    )
    trained = dataclasses.replace(config, adapter=chosen["adapter"]) if chosen else config
    new_tokens = _new_tokens(task, log)
    model, metrics = _adapt_seeded(model, trained, chosen, log, new_tokens, task)
    metrics["base_dropout"] = base_dropout
    splits = _load_splits(task, trained, log)
    metrics.update(_before_training(task, model, splits, trained, chosen, world, log))
    if world.is_main:
        # only now, with the model, the targets and the data loaded: a config mistake found on the way
        # leaves no half-made run behind that would make the corrected rerun ask for --resume.
        # config.yaml keeps `target_modules: auto` as given; the choice is in selection/
        dump_config(config, run_dir / CONFIG_NAME)
    result = _fit(task, model, splits, trained, to_dict(config), run_dir, resume, log)
    return _write_outputs(task, model, splits, trained, result, metrics, run_dir, world, log)


def _claim_run_dir(run_dir: Path, config: RunConfig, resume: bool, log: Log) -> bool:
    """Rank 0's check of ``output_dir`` before anything is loaded; whether to resume."""
    _check_run_dir(run_dir, config, resume, log)
    if resume and latest_checkpoint(run_dir / "checkpoints") is None:
        # killed before its first checkpoint: nothing to continue, so --resume starts the run over
        log(f"no complete checkpoint in {run_dir / 'checkpoints'}: starting the run from step 0")
        return False
    return resume


def _new_tokens(task: Task, log: Log) -> list[int]:
    """The ids of the tokens ``data.add_special_tokens`` gave the tokenizer (none for other tasks)."""
    ids = list(getattr(task, "new_token_ids", list)())
    if ids:
        log(f"new tokens: ids {ids} (data.add_special_tokens); their embedding rows train with the adapter")
    return ids


def _set_base_dropout(model: nn.Module, config: RunConfig, log: Log) -> dict[str, Any]:
    """The frozen base's dropout as ``model.base_dropout`` says; a fresh task head keeps its own (everything
    outside a transformers model's ``base_model``). What was done goes into ``metrics.json``."""
    mode = base_dropout_mode(config.model, is_full_fine_tuning(config))
    report = set_base_dropout(model, mode, skip=head_outside_base(model)).as_dict()
    if mode != "keep":
        log(
            f"base dropout {mode}: {report['attention_zeroed']} attention and {report['other_zeroed']} "
            "other dropouts of the frozen base set to 0 (model.base_dropout)"
        )
    return report


def _adapt_seeded(
    model: nn.Module,
    config: RunConfig,
    chosen: dict[str, Any] | None,
    log: Log,
    new_tokens: Sequence[int] = (),
    task: Task | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """The adapter injected from a seeded start (or every parameter trainable); the first facts of
    ``metrics.json``."""
    seed_everything(config.train.seed)  # the adapter's initialisation draws random numbers
    step = _init_step(task, model, config, log) if task is not None and _needs_init_data(config) else None
    facts: dict[str, Any] = {}
    model = adapt(model, config, new_tokens, step, task, log, facts)
    init_from = None if is_full_fine_tuning(config) else config.select.init_from
    start_from_directions(model, chosen, init_from, ADAPTER_NAME, log)
    summary = api.trainable_summary(model, show=False)
    log(
        f"{config.task}: {config.model.name_or_path} with {_method(config)}: trainable params "
        f"{summary.trainable:,} of {summary.total:,} ({summary.percent:.2f}%)"
    )
    metrics = {
        "task": config.task,
        "model": config.model.name_or_path,
        "method": _method(config),
        "trainable_params": summary.trainable,
        "total_params": summary.total,
        **facts,
    }
    return model, metrics


def _inject_logging_start(model: nn.Module, adapter: Any, log: Log) -> nn.Module:
    """``api.inject``, with its warnings about where the adapter starts as lines of the run's log, read
    beside the rest, instead of Python warnings that print a source line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FreshAdapterWarning)
        api.inject(model, adapter, ADAPTER_NAME)
    for warning in caught:
        if issubclass(warning.category, FreshAdapterWarning):
            log(f"warning: {warning.message}")
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    return model


def _needs_init_data(config: RunConfig) -> bool:
    if is_full_fine_tuning(config):
        return False
    fields = {k: v for k, v in config.adapter.items() if k != "method"}
    return api.make_config(config.adapter.get("method", DEFAULT_METHOD), **fields).needs_init_data()


def _init_step(task: Task, model: nn.Module, config: RunConfig, log: Log) -> Callable[[], None]:
    """Forward and backward passes on the first ``select.probe_batches`` training batches (of
    ``select.probe_batch_size``, else ``train.batch_size``), for an init that starts from gradients."""
    train = task.load_data().get("train") or []
    if not train:
        raise ConfigError(
            [
                "data: the train split is empty, and the adapter's init starts from training batches' gradients"
            ],
            what="run config",
        )
    size = config.select.probe_batch_size or config.train.batch_size
    examples = list(train[: size * config.select.probe_batches])
    batches = [task.collate(examples[i : i + size]) for i in range(0, len(examples), size)]
    log(f"adapter init: the adapted weights' gradients on {len(batches)} training batches of {size}")

    def step() -> None:
        for batch in batches:
            task.loss(model, batch).backward()

    return step


def _load_splits(task: Task, config: RunConfig, log: Log) -> Mapping[str, Sequence[Any]]:
    """The task's splits, checked as far as encoding them: what only encoding finds (a chat template that
    refuses the data, a malformed record) stops the run here, before a run directory exists."""
    splits = task.load_data()
    log(
        "data: "
        + ", ".join(f"{name} {len(splits.get(name, [])):,}" for name in ("train", "validation", "test"))
    )
    if not splits.get("train"):
        raise ConfigError(
            ["data: the train split is empty; check data.files, data.split and data.max_train_examples"]
        )
    task.collate(splits["train"][: config.train.batch_size])
    return splits


def _before_training(
    task: Task,
    model: nn.Module,
    splits: Mapping[str, Sequence[Any]],
    config: RunConfig,
    chosen: dict[str, Any] | None,
    world: World,
    log: Log,
) -> dict[str, Any]:
    """Facts for ``metrics.json`` known before training: the head, the selection, the untrained score."""
    facts: dict[str, Any] = {}
    head = getattr(task, "head_info", None)
    if head:
        facts["head"] = head
        log(f"head: {head['pooling']} pooling ({head['why']})")
    if chosen is not None:
        facts["selection"] = {k: v for k, v in chosen.items() if k not in ("adapter", "init")}
    if config.eval.before_training and splits.get("test") and world.is_main:
        full = is_full_fine_tuning(config)
        facts["before"] = _evaluate_base(task, model, splits["test"], config.eval.batch_size, full)
        log(f"test before training: {_format(facts['before'])}")
    return facts


def _fit(
    task: Task,
    model: nn.Module,
    splits: Mapping[str, Sequence[Any]],
    config: RunConfig,
    recorded: dict[str, Any],
    run_dir: Path,
    resume: bool,
    log: Log,
) -> Any:
    """The training loop, ending with the best evaluated weights in the model (``restore_best``)."""
    validation = splits.get("validation") or []
    batch_size = config.eval.batch_size
    return fit(
        model,
        splits["train"],
        task.collate,
        task.loss,
        config.train,
        evaluate=(lambda m: task.evaluate(m, validation, batch_size)) if validation else None,
        run_dir=run_dir,
        resume=resume,
        adapter_name=ADAPTER_NAME,
        log=log,
        run_config=recorded,
        restore_best=True,
    )


def _write_outputs(
    task: Task,
    model: nn.Module,
    splits: Mapping[str, Sequence[Any]],
    config: RunConfig,
    result: Any,
    metrics: dict[str, Any],
    run_dir: Path,
    world: World,
    log: Log,
) -> RunResult:
    """The test score of the weights ``fit`` ended with, ``metrics.json``, and the adapter, written once."""
    metrics.update(_fit_facts(result))
    if not result.ok:  # diverged or interrupted: keep the checkpoints as they are, report why
        if world.is_main:
            _write_json(run_dir / METRICS_NAME, metrics)
        return RunResult(run_dir, metrics, result)
    if not world.is_main:
        if config.train.distributed == "fsdp" and splits.get("test"):
            # a sharded model's forward pass gathers weights from every rank: take part in rank 0's
            # test evaluation (this rank's own numbers are not used)
            task.evaluate(model, splits["test"], config.eval.batch_size)
        return RunResult(run_dir, metrics, result)
    if splits.get("test"):
        metrics["test"] = task.evaluate(model, splits["test"], config.eval.batch_size)
        log(f"test ({metrics['weights']}): {_format(metrics['test'])}")
    data_info = getattr(task, "data_info", None) or getattr(splits, "info", None)
    if data_info:
        metrics["data"] = data_info
    full = is_full_fine_tuning(config)
    out = run_dir / (FULL_MODEL_DIR if full else ADAPTER_DIR)
    save_weights(
        model,
        out,
        None if full else ADAPTER_NAME,
        {"step": metrics.get("best_step"), "test": metrics.get("test")},
        # an init that loading cannot redo (LoRA-GA) is exported relative to the original base
        portable=not full and api.adapter_config(model, ADAPTER_NAME).export_portable(),
    )
    if config.data.add_special_tokens:
        # the tokenizer that holds the new tokens goes beside the weights: AutoTokenizer reads it from the
        # adapter directory, as serving engines that take an adapter's own tokenizer do, and load_run uses it
        with _no_progress_bars():
            task.tokenizer.save_pretrained(out)
    _write_json(run_dir / METRICS_NAME, metrics)
    log(f"saved {out}, {run_dir / METRICS_NAME}")
    return RunResult(run_dir, metrics, result)


def select_run(config: RunConfig, out_dir: str | os.PathLike, log: Log = print) -> Path:
    """``peftkit select``: choose the adapter for ``config`` under ``config.select.budget`` and write, into
    ``out_dir``, ``selected.yaml`` (the config with the chosen targets and ranks: train it as it is) and
    the explanation (``selection.md``, ``selection.png``, ``selection.json``). Returns ``selected.yaml``'s path.

    Raises:
        ConfigError: no budget, or a method the selection cannot allocate for (LoRA's are).
    """
    require_selectable(config.adapter)
    config = resolved(config)
    task = build_task(config)
    model = task.load_model()
    selection = select_for_run(config, task, model, log)
    out = Path(out_dir)
    select_report.write(selection, out)
    # the chosen adapter trains as it is; with the probe's directions as its starting point, when it has them
    # absolute, like every path of a resolved config: selected.yaml trains from any working directory
    start = str((out / select_init.INIT_FILE).resolve()) if selection.init else None
    chosen = dataclasses.replace(
        config,
        adapter=selection.adapter,
        select=type(config.select)(init_from=start),
        output_dir=f"{config.output_dir.rstrip('/')}-{AUTO}",
    )
    path = out / "selected.yaml"
    dump_config(chosen, path)
    log(f"wrote {path} (train it: peftkit train {path}) and the explanation in {out / select_report.TABLE}")
    return path


def _silent(line: str) -> None:
    """The log of ranks other than 0: rank 0 reports for every rank."""


def _check_run_dir(run_dir: Path, config: RunConfig, resume: bool, log: Log) -> None:
    """Refuse to mix a new run into an old one; on resume, say which settings changed."""
    previous = run_dir / CONFIG_NAME
    # A run is what training left: its log of steps, a checkpoint or saved weights. A config.yaml alone
    # (an older peftkit wrote it before loading anything) is not one, and a fresh start may replace it.
    holds_run = (run_dir / "metrics.jsonl").is_file() or any(
        (run_dir / d).is_dir() and any((run_dir / d).iterdir())
        for d in ("checkpoints", "best", "final", ADAPTER_DIR, FULL_MODEL_DIR)
    )
    if holds_run and not resume:
        raise ConfigError(
            [
                f"output_dir: {_shown(run_dir)!r} already holds a run; pass --resume to continue it, or start a new "
                f"one elsewhere (e.g. output_dir={_shown(run_dir.with_name(run_dir.name + '-2'))}), or delete the "
                "directory"
            ],
            what="run config",
        )
    if resume and previous.is_file():
        changed = _changed_fields(load_config(previous), config)
        if changed:
            log(f"resuming with changed settings: {', '.join(changed)}")


def _shown(path: Path) -> str:
    """``path`` as the user likely wrote it: relative to the working directory when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _changed_fields(old: Any, new: Any, prefix: str = "") -> list[str]:
    if dataclasses.is_dataclass(old) and dataclasses.is_dataclass(new):
        return [
            path
            for f in dataclasses.fields(old)
            for path in _changed_fields(getattr(old, f.name), getattr(new, f.name), f"{prefix}{f.name}.")
        ]
    return [] if old == new else [prefix.rstrip(".")]


def _evaluate_base(
    task: Task, model: nn.Module, examples: Sequence[Any], batch_size: int, full: bool
) -> dict:
    if full:  # nothing trained yet: the model is the base model
        return task.evaluate(model, examples, batch_size)
    with api.disable(model):  # exactly the base model's outputs
        return task.evaluate(model, examples, batch_size)


def _fit_facts(result: Any) -> dict[str, Any]:
    """The training loop's result as JSON-ready facts for ``metrics.json``."""
    facts = {
        "status": getattr(result, "status", "completed"),
        "weights": getattr(result, "weights", "last step"),
        "best_step": getattr(result, "best_step", None),
        "best_validation": getattr(result, "best_metric", None),
        "steps": getattr(result, "steps", None),
        "stopped_early": getattr(result, "stopped_early", False),
        "stop_reason": getattr(result, "stop_reason", None),
        "train_seconds": getattr(result, "train_seconds", None),
        "peak_memory_mb": getattr(result, "peak_memory_mb", None),
        "precision": getattr(result, "precision", None),
    }
    losses = list(getattr(result, "losses", None) or [])
    facts["final_train_loss"] = losses[-1] if losses else None
    return facts


def _method(config: RunConfig) -> str:
    return (
        FULL_FINE_TUNING
        if is_full_fine_tuning(config)
        else str(config.adapter.get("method", DEFAULT_METHOD)).lower()
    )


def _format(metrics: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def _write_json(path: Path, data: Any) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2, default=_jsonable, allow_nan=True) + "\n")
    os.replace(temporary, path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return str(value)


# -- use a finished run ----------------------------------------------------------------------------


def load_run(run_dir: str | os.PathLike) -> LoadedRun:
    """Rebuild the trained model of the run in ``run_dir`` (in eval mode).

    The weights come from ``adapter/`` (``model/`` for full fine-tuning), or, for a run that has not
    finished, from ``best/``, ``final/`` or the latest checkpoint.

    Raises:
        FileNotFoundError: ``run_dir`` is not a run directory, or holds no weights yet.
    """
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_NAME).is_file():
        hint = " (it is a file: give the run's output_dir)" if run_dir.is_file() else ""
        raise FileNotFoundError(
            f"{str(run_dir)!r} is not a run directory: it has no {CONFIG_NAME}{hint}; give the output_dir of a "
            "`peftkit train` run"
        )
    config = load_config(run_dir / CONFIG_NAME)
    full = is_full_fine_tuning(config)
    weights = weights_dir(run_dir, full)
    task = build_task(config)
    if (weights / TOKENIZER_MARKER).is_file() and hasattr(task, "tokenizer"):
        task.tokenizer = _saved_tokenizer(weights)  # the run's own, holding its added tokens
    model = task.load_model()
    if full:
        load_weights(model, weights)
    else:
        api.load_adapter(model, weights, ADAPTER_NAME)
    model.eval()
    return LoadedRun(config, task, model, weights)


def _saved_tokenizer(directory: Path) -> Any:
    from transformers import AutoTokenizer

    from ..models import quiet_transformers

    with quiet_transformers():
        return AutoTokenizer.from_pretrained(str(directory))


def weights_dir(run_dir: Path, full: bool) -> Path:
    """The directory holding the run's trained weights: its adapter/ (model/), else best/, final/ or the
    latest checkpoint (raises FileNotFoundError naming where it looked)."""
    marker = "model.safetensors" if full else "adapter_config.json"
    candidates = [run_dir / (FULL_MODEL_DIR if full else ADAPTER_DIR), run_dir / "best", run_dir / "final"]
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*"), reverse=True)
    candidates += [c if full else c / "adapter" for c in checkpoints]
    for directory in candidates:
        if (directory / marker).is_file():
            return directory
    raise FileNotFoundError(
        f"run {str(run_dir)!r} holds no trained weights yet (looked for {marker} in "
        f"{', '.join(str(c.relative_to(run_dir)) for c in candidates[:3])} and checkpoints/); "
        "train it first, or resume it with `peftkit train CONFIG --resume`"
    )


def eval_run(
    source: str | os.PathLike | RunConfig, split: str | None = None, *, batch_size: int | None = None
) -> dict[str, Any]:
    """Metrics of a trained run, or of the untrained base model of a config, on one split.

    Args:
        source: A run directory (its trained weights), or a :class:`RunConfig` (its base model without
            an adapter: the number training should beat).
        split: "train", "validation" or "test"; default ``eval.split`` of the config.
        batch_size: Examples per forward pass; default ``eval.batch_size``.

    Returns:
        ``{"split": ..., "examples": n, <metric>: value, ...}``; for a run directory also written to
        ``eval-<split>.json`` there.

    Raises:
        ConfigError: the split is unknown or empty.
        FileNotFoundError: ``source`` is not a run directory or holds no weights.
    """
    if isinstance(source, RunConfig):
        config, run_dir = source, None
        task = build_task(config)
        model = task.load_model().eval()
    else:
        loaded = load_run(source)
        config, task, model, run_dir = loaded.config, loaded.task, loaded.model, Path(source)
    split = split or config.eval.split
    examples = _split_examples(task, split)
    metrics = {
        "split": split,
        "examples": len(examples),
        **task.evaluate(model, examples, batch_size or config.eval.batch_size),
    }
    if run_dir is not None:
        _write_json(run_dir / f"eval-{split}.json", metrics)
    return metrics


def _split_examples(task: Task, split: str) -> Sequence[Any]:
    if split not in ("train", "validation", "test"):
        raise ConfigError([f"split: expected train, validation or test, got {split!r}"], what="evaluation")
    examples = task.load_data().get(split) or []
    if not examples:
        raise ConfigError(
            [f"split: the {split} split is empty for this data; choose another split"], what="evaluation"
        )
    return examples


def predict_run(
    run_dir: str | os.PathLike,
    inputs: Sequence[Any],
    batch_size: int | None = None,
    input_key: str | None = None,
    *,
    generation: Mapping[str, Any] | None = None,
    stream: bool = False,
) -> list[Any]:
    """The trained run's predictions for raw ``inputs`` (texts, prompts, ... as the task takes them).

    Args:
        run_dir: A run directory.
        inputs: Plain values (a text, a prompt, an image path) or mappings (JSON objects).
        batch_size: Inputs per forward pass (default ``eval.batch_size``).
        input_key: The key of a mapping input that holds the input (default: the task's own, such as
            ``text`` or ``prompt``).
        generation: Generation tasks: fields of the run's ``generation`` section to change for these
            predictions, e.g. ``{"max_new_tokens": 64, "temperature": 0.7}``.
        stream: Generation tasks, one input: print the answer to standard output as it is generated.

    Raises:
        FileNotFoundError: ``run_dir`` is not a run directory or holds no weights.
        ConfigError: a mapping input lacks the key (the message names the keys it has and ``--input-key``),
            a generation setting is out of range, or the task cannot generate / stream.
    """
    loaded = load_run(run_dir)
    with_generation(loaded, generation or {}, stream=stream, inputs=len(inputs))
    if not inputs:
        return []
    inputs = _task_inputs(
        list(inputs), loaded.task.input_role, input_key, getattr(loaded.task, "record_keys", ())
    )
    batch_size = batch_size or loaded.config.eval.batch_size
    if stream:
        from ..tasks.generation import terminal_streamer

        return list(
            loaded.task.predict(loaded.model, inputs, 1, streamer=terminal_streamer(loaded.task.tokenizer))
        )
    return list(loaded.task.predict(loaded.model, inputs, batch_size))


def with_generation(
    loaded: LoadedRun, changes: Mapping[str, Any], *, stream: bool = False, inputs: int = 1
) -> None:
    """Apply ``changes`` to the loaded run's ``generation`` settings (checked like a config file).

    Raises:
        ConfigError: a setting is out of range, the task does not generate, or streaming was asked
            for with several inputs or with beam search.
    """
    from ..tasks.causal_lm import GenerationTask

    generates = isinstance(loaded.task, GenerationTask)
    problems = []
    if (changes or stream) and not generates:
        problems.append(
            f"generation options: task {loaded.config.task!r} does not generate text; they apply to "
            "causal-lm and seq2seq runs"
        )
    if changes and generates:
        settings = dataclasses.replace(loaded.config.generation, **changes)
        if "max_new_tokens" in changes:  # the option is the newest word on the length
            loaded.config.eval.max_new_tokens = None
        candidate = dataclasses.replace(loaded.config, generation=settings)
        problems += [p for p in value_problems(candidate) if p.startswith("generation.")]
        loaded.config.generation = settings
        loaded.task.generation = settings  # the task holds its sections, not the run config
    if stream and inputs != 1:
        problems.append(
            f"--stream shows one answer as it is written; got {inputs} inputs (give one prompt, "
            "or drop --stream)"
        )
    if stream and loaded.config.generation.num_beams > 1:
        problems.append("--stream: beam search settles its answer only at the end; use num_beams 1 to stream")
    if problems:
        raise ConfigError(problems, what="predict options")


def _task_inputs(inputs: list[Any], role: str, key: str | None, record_keys: Sequence[str] = ()) -> list[Any]:
    """Mapping inputs rewritten as ``{role: value}`` from ``key`` (default ``role``); other inputs as they are.

    Without ``key``, a mapping holding one of ``record_keys`` (a chat record: ``messages``, ...) and no
    ``role`` is passed whole: the task reads it as a conversation.
    """
    out = []
    for number, item in enumerate(inputs, 1):
        if isinstance(item, Mapping):
            if key is None and role not in item and any(k in item for k in record_keys):
                out.append(item)
                continue
            wanted = key or role
            if wanted not in item:
                keys = sorted(map(str, item))
                example = keys[0] if keys else role
                records = f", a chat record ({', '.join(record_keys)})" if record_keys else ""
                raise ConfigError(
                    [
                        f"input {number} is a JSON object without {wanted!r} (its keys: {', '.join(map(repr, keys)) or 'none'}); "
                        f"name the key that holds the {role} with --input-key (e.g. --input-key {example}), or give one "
                        f"plain {role} per line{records}"
                    ],
                    what="predict input",
                )
            item = {role: item[wanted]}
        out.append(item)
    return out


def merge_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Export the trained run as one plain model directory (adapter folded into the weights).

    The directory is what transformers' ``from_pretrained`` loads, with the tokenizer (or processor)
    saved beside it, so serving it needs neither peftkit nor the adapter. A run on a quantized base
    (``model.quantize``) is exported dense, in the compute dtype.

    Raises:
        FileExistsError: ``out_dir`` exists and is not empty.
        AdapterNameError: the method changes inputs or attention rather than weights (soft prompts,
            bottleneck adapters) and cannot be merged.
        TypeError: the model is not a transformers model (it has no ``save_pretrained``).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(
            f"{str(out_dir)!r} already exists and is not empty; give a new directory for the merged model"
        )
    loaded = load_run(run_dir)
    model = loaded.model
    if not is_full_fine_tuning(loaded.config):
        # checked for NaN/inf before any weight changes; a 4/8-bit base (model.quantize) is exported
        # dense, so the merge is exact and the directory loads without bitsandbytes
        # untie: LoRA on a tied embedding merges into the embedding alone, the head keeps its own copy
        # (docs/tokens.md); trainable tokens keep a tie as it is
        model = api.unload(model, merge=True, dequantize=bool(loaded.config.model.quantize), untie=True)
    if not callable(getattr(model, "save_pretrained", None)):
        raise TypeError(
            f"merge exports transformers models (with save_pretrained); this run's model is a "
            f"{type(model).__name__}: use peftkit.unload(model, merge=True) and torch.save its state_dict instead"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Written next to its final place and renamed: a failed export leaves no half-written model.
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        with _no_progress_bars():
            model.save_pretrained(staging)
            processor = getattr(loaded.task, "tokenizer", None) or getattr(loaded.task, "processor", None)
            if callable(getattr(processor, "save_pretrained", None)):
                processor.save_pretrained(staging)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def merged_loader(out_dir: str | os.PathLike) -> str:
    """The one line of Python that loads what :func:`merge_run` wrote to ``out_dir``."""
    try:
        config = json.loads((Path(out_dir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "transformers' from_pretrained"
    auto = next(iter(config.get("auto_map") or {}), None)
    if auto:
        # a head transformers has no class for (peftkit's pooled classifier): its code is in the directory
        return f"transformers.{auto}.from_pretrained({str(out_dir)!r}, trust_remote_code=True)"
    architecture = next(iter(config.get("architectures") or []), None)
    return (
        f"transformers.{architecture}.from_pretrained({str(out_dir)!r})"
        if architecture
        else "transformers' from_pretrained"
    )


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    # transformers draws a bar per saved shard: noise on the command line. Restore the setting after.
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()

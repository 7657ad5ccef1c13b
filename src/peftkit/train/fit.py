"""``fit``: the one training loop of peftkit, for any ``nn.Module``, resumable bit for bit.

The loop is plain code, read top to bottom in :func:`fit` and :func:`_loop`: each optimizer step
takes ``grad_accum`` micro-batches from a seeded order (``order.py``), computes ``loss(model, batch)``
under optional bfloat16 autocast, back-propagates the example-weighted mean, checks the loss and the
gradient norm are finite, clips, steps AdamW and the schedule; then it logs, evaluates, keeps the
best weights, stops early, and writes checkpoints (``checkpoint.py``) as the config asks.

Failures: exceptions raised by ``collate``, ``loss`` or ``evaluate`` propagate unchanged (nothing is
swallowed; the last checkpoint on disk stays as it was). A non-finite loss or gradient does not
raise: by default (``on_nonfinite: stop``) the run stops before applying that step, the message is
logged, and the returned :class:`FitResult` has ``status="diverged"`` and a ``stop_reason`` naming the
step and the fixes to try. With ``on_nonfinite: skip`` the step's optimizer update is dropped (the data,
the schedule and the step count move on), the step is logged and counted, and only a run of
``MAX_SKIPS_IN_A_ROW`` skipped steps followed by another non-finite one stops it. Ctrl-C (SIGINT, main thread) finishes the current step, writes a checkpoint and returns with
``status="interrupted"``; a second Ctrl-C aborts at once.

Several processes (``torchrun``, see ``docs/distributed.md``): ``fit`` starts the process group from
the environment when none is running (``distributed.ensure_process_group``), gives every rank its
share of each micro-batch (``order.py``), trains through ``DistributedDataParallel``
(``distributed.py``), sums the loss over ranks, and lets rank 0 alone read and write the run
directory, evaluate and log. One process runs the same code with every collective a no-op.

``restore_best`` ends the run with the best evaluated weights in the model (:func:`_restore_best`), so
that a caller tests and saves them as they are, once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ..core.inject import is_adapted, state_of
from ..errors import AdapterMismatchError, ConfigError
from . import distributed
from .checkpoint import (
    latest_checkpoint,
    load_trainable_state,
    preserved_rng,
    put_weights,
    read_checkpoint,
    read_trainer_state,
    read_weights,
    remove_stale_temporaries,
    rng_state,
    save_checkpoint,
    save_weights,
    seed_everything,
    set_rng_state,
    weights_in_memory,
)
from .config import TrainConfig
from .distributed import World
from .experiment_logging import parameter_counts, reported_to
from .optim import make_optimizer
from .order import DataPlan
from .runtime import (
    gradient_checkpointing,
    interrupt_flag,
    peak_memory_mb,
    resolve_device,
    resolve_precision,
    to_device,
    train_config_problems,
)
from .schedule import lr_multiplier, make_scheduler, warmup_steps_for
from .tracking import Tracker, format_seconds

# Settings that change the weights a run ends with: a resume must use the ones the run started with.
RESUME_FIELDS = (
    "steps",
    "epochs",
    "batch_size",
    "grad_accum",
    "lr",
    "weight_decay",
    "lora_plus_ratio",
    "optimizer",
    "schedule",
    "warmup_steps",
    "warmup_ratio",
    "max_grad_norm",
    "precision",
    "seed",
    "metric",
    "greater_is_better",
)
# With train.on_nonfinite "skip": this many skipped steps in a row, and the next non-finite step stops the
# run. A few bad batches in a row happen (a spike in bf16); ten means the weights themselves went bad.
MAX_SKIPS_IN_A_ROW = 10
# resume-key fields added after checkpoints of earlier versions were written: the value those meant
RESUME_KEY_DEFAULTS = {"world_size": 1, "optimizer": "adamw"}


@dataclass
class FitResult:
    """What a :func:`fit` call did.

    Attributes:
        steps: Optimizer steps done (including those before a resume).
        losses: Training loss of every step (the example-weighted mean over its micro-batches).
        history: One dict per evaluation: ``{"step": s, <metric>: value, ...}``.
        best_metric: Best value of ``config.metric`` seen (None without evaluation).
        best_step: The step it was seen at; ``run_dir/best/`` holds those weights.
        stopped_early: Early stopping ended the run.
        stop_reason: One sentence on why the run ended.
        train_seconds: Wall time of the loop (training, evaluation, checkpoints), over all resumes.
        peak_memory_mb: CUDA: peak allocated memory of this call; CPU: peak resident memory of the process.
        status: "completed", "early_stopped", "diverged" (non-finite loss) or "interrupted" (Ctrl-C).
        run_dir: Where files went (None when nothing was written).
        skipped_steps: Steps (1-based) whose update was skipped for a non-finite loss or gradient
            (``on_nonfinite: skip``); their entries in ``losses`` are the non-finite values.
        weights: The weights the model holds on return: "best" (those of ``best_step``, put back by
            ``restore_best``), "final" (the last step's of a run that ended as planned, as in ``final/``)
            or "last step" (a run that diverged or was interrupted).
        precision: The precision the steps ran in, "fp32" or "bf16" (``config.precision`` resolved).
    """

    steps: int
    losses: list[float]
    history: list[dict[str, float]]
    best_metric: float | None
    best_step: int | None
    stopped_early: bool
    stop_reason: str
    train_seconds: float
    peak_memory_mb: float
    status: str = "completed"
    run_dir: Path | None = None
    skipped_steps: list[int] = field(default_factory=list)
    weights: str = "last step"
    precision: str = "fp32"

    @property
    def ok(self) -> bool:
        """The run ended as planned (all steps, or early stopping); weights are in ``final/``."""
        return self.status in ("completed", "early_stopped")


@dataclass
class _State:
    """Everything about the run's progress that a checkpoint stores (``trainer_state.json``)."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)
    best_metric: float | None = None
    best_step: int | None = None
    bad_evals: int = 0  # evaluations since the last improvement (early stopping)
    train_seconds: float = 0.0
    status: str = "running"
    stop_reason: str = ""
    skipped_steps: list[int] = field(default_factory=list)  # on_nonfinite "skip": steps not applied
    skips_in_a_row: int = 0


@dataclass
class _Run:
    """The fixed parts of one :func:`fit` call, passed to the loop's helpers."""

    model: nn.Module
    examples: Sequence[Any]
    collate: Callable[[list[Any]], Any]
    loss: Callable[[nn.Module, Any], torch.Tensor]
    config: TrainConfig
    evaluate: Callable[[nn.Module], Mapping[str, float]] | None
    run_dir: Path | None
    adapter: str | None  # None: full fine-tuning (no peftkit adapter on the model)
    device: torch.device
    plan: DataPlan
    warmup: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    resume_key: dict[str, Any]
    state: _State
    hook: Any = None  # the adapter's training hook (AdapterConfig.training_hook), e.g. AdaLoRA's allocator
    world: World = field(default_factory=World)
    train_model: nn.Module | None = (
        None  # what loss() gets: the model, or its DistributedDataParallel wrapper
    )
    evaluates: bool = False  # rank 0 has an evaluate function (the other ranks follow its decisions)
    restore_best: bool = False
    best_weights: dict[str, torch.Tensor] | None = None  # restore_best: what best/ holds, kept in memory

    @property
    def writes(self) -> bool:
        """This process writes the run's files: a run directory is set and this is rank 0."""
        return self.run_dir is not None and self.world.is_main


def fit(
    model: nn.Module,
    train_examples: Sequence[Any],
    collate: Callable[[list[Any]], Any],
    loss: Callable[[nn.Module, Any], torch.Tensor],
    config: TrainConfig,
    *,
    evaluate: Callable[[nn.Module], Mapping[str, float]] | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    adapter_name: str = "default",
    log: Callable[[str], None] = print,
    run_config: Mapping[str, Any] | None = None,
    restore_best: bool = False,
) -> FitResult:
    """Train ``model`` in place on ``train_examples``.

    Seed the model's own initialisation (e.g. :func:`seed_everything` before ``peftkit.inject``)
    yourself; ``fit`` seeds the data order, dropout and everything after (``config.seed``). The model
    is moved to ``config.device`` and left there, in training mode, holding the weights of the last
    step (or, with ``restore_best``, the best evaluated ones); ``run_dir/best/`` holds the best
    evaluated weights (:func:`peftkit.train.load_weights`).

    Args:
        model: Any module. With a peftkit adapter, its trainable parameters are trained and
            ``best/``/``final/`` hold the adapter; without (full fine-tuning) every parameter with
            ``requires_grad`` is trained and saved as ``model.safetensors``.
        train_examples: Indexable examples (a list, a ``datasets.Dataset`` ...).
        collate: ``collate(list_of_examples) -> batch`` (tensors on CPU; moved to the device here).
        loss: ``loss(model, batch) -> scalar tensor``, the mean over the batch.
        config: The settings (:class:`peftkit.train.TrainConfig`).
        evaluate: ``evaluate(model) -> {metric: value}`` on validation data; called in eval mode,
            under ``torch.no_grad`` and without disturbing the training random streams.
        run_dir: Where ``checkpoints/``, ``best/``, ``final/``, ``metrics.jsonl``, ``tensorboard/``
            go; None writes nothing, starts no experiment logger (and cannot resume).
        resume: Continue from the newest complete checkpoint in ``run_dir/checkpoints``.
        adapter_name: The adapter to train and save, when the model has peftkit adapters.
        log: Receives human-readable progress lines (on rank 0 only, with several processes).
        run_config: The whole run's settings as plain data (e.g. a YAML run config as a dict), which
            the experiment loggers of ``config.report_to`` record (wandb config, MLflow params);
            None records ``{"train": <config as a dict>}``. Nothing else reads it.
        restore_best: When the run ends as planned, put the best evaluated weights back into the model
            (``result.weights`` says which it holds). An adapter's are kept in memory (a CPU copy of what
            ``best/`` holds); a fully fine-tuned model's are read back from ``best/`` (from memory without
            a ``run_dir``), as are those of an evaluation before a resume. An adapter whose saved shape
            changed since (AdaLoRA prunes its ranks) keeps its final weights.

    With several processes (``torch.distributed`` initialised, or ``torchrun``'s environment set, in
    which case ``fit`` starts the group for the rest of the process, destroyed at exit), every rank calls ``fit`` with the same model, examples and
    config; ``config.batch_size`` is per rank. Rank 0's ``run_dir``, ``resume`` and ``evaluate``
    decide for all: the other ranks never touch the run directory and need no ``evaluate``.

    Returns:
        A :class:`FitResult`; check ``result.ok`` (a non-finite loss returns ``status="diverged"``).

    Raises:
        ConfigError: invalid settings, no trainable parameter, resume without (or with a mismatching)
            checkpoint, ``run_dir`` already holding another run's checkpoints, a metric ``evaluate``
            does not return.
    """
    _check_arguments(config, train_examples, evaluate, run_dir, resume)
    device = resolve_device(config.device)
    # a script launched by torchrun may call fit without owning the group: it is then started for the
    # rest of the process (distributed.ensure_process_group says why, and how it ends)
    world = distributed.ensure_process_group(device)
    device = distributed.training_device(device, world)
    # "auto" becomes what this device runs (bf16 where native); everything after, the resume key included,
    # sees the resolved value, so a checkpoint says what its steps actually computed in
    config = dataclasses.replace(config, precision=resolve_precision(config.precision, device))
    _check_world(world, len(train_examples))
    # rank 0's choices decide for every rank (the others may not even see its run directory)
    run_dir, resume, evaluates = distributed.broadcast(
        (str(run_dir) if run_dir is not None else None, resume, evaluate is not None), world
    )
    run_dir = Path(run_dir) if run_dir is not None else None
    if (
        world.active
        and config.distributed == "fsdp"
        and distributed.any_across(evaluates and evaluate is None, device, world)
    ):
        raise ConfigError(
            [
                "train.distributed: fsdp evaluates on every process (a sharded model's forward pass "
                "needs all of them): pass evaluate= on every rank, not only on rank 0"
            ],
            what="distributed training",
        )
    if config.early_stopping_patience is not None and not evaluates:  # after the broadcast: every rank alike
        raise ConfigError(
            ["train.early_stopping_patience needs evaluation: pass evaluate= (a validation split)"],
            what="training config",
        )
    return _fit(
        model,
        train_examples,
        collate,
        loss,
        config,
        evaluate,
        evaluates,
        run_dir,
        resume,
        adapter_name,
        log,
        device,
        world,
        run_config,
        restore_best,
    )


def _fit(
    model: nn.Module,
    train_examples: Sequence[Any],
    collate: Callable[[list[Any]], Any],
    loss: Callable[[nn.Module, Any], torch.Tensor],
    config: TrainConfig,
    evaluate: Callable[[nn.Module], Mapping[str, float]] | None,
    evaluates: bool,
    run_dir: Path | None,
    resume: bool,
    adapter_name: str,
    log: Callable[[str], None],
    device: torch.device,
    world: World,
    run_config: Mapping[str, Any] | None,
    restore_best: bool,
) -> FitResult:
    adapter = _adapter_of(model, adapter_name)
    model.to(device)
    plan = DataPlan.for_run(
        len(train_examples),
        config.batch_size,
        config.grad_accum,
        config.seed,
        config.steps,
        config.epochs,
        world.size,
    )
    warmup = warmup_steps_for(config.warmup_steps, config.warmup_ratio, plan.total_steps)
    optimizer = make_optimizer(
        model, config.lr, config.weight_decay, config.lora_plus_ratio, config.optimizer
    )
    scheduler = make_scheduler(optimizer, config.schedule, warmup, plan.total_steps)
    # the direction actually used, so a checkpoint written before greater_is_better could be unset resumes
    key = {
        **{name: getattr(config, name) for name in RESUME_FIELDS},
        "greater_is_better": config.maximize,
        "train_examples": len(train_examples),
        "device_type": device.type,
        "world_size": world.size,
    }
    state, rng = _start(run_dir, resume, key, plan, model, optimizer, scheduler, config.seed, world)
    run = _Run(
        model,
        train_examples,
        collate,
        loss,
        config,
        evaluate,
        run_dir,
        adapter,
        device,
        plan,
        warmup,
        optimizer,
        scheduler,
        key,
        state,
        _training_hook(model, adapter, plan.total_steps),
        world,
        evaluates=evaluates,
        restore_best=restore_best,
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if world.is_main:
        recorded = dict(run_config) if run_config is not None else {"train": dataclasses.asdict(config)}
        tracker = Tracker(
            run_dir,
            state.step,
            plan.total_steps,
            report_to=reported_to(config),
            progress=config.progress,
            log=log,
            config=recorded,
            summary=parameter_counts(model) if run_dir is not None else None,
        )
    else:  # one voice: the other ranks neither log nor write
        tracker = Tracker(None, state.step, plan.total_steps, progress=False, log=_silent)
    status = "failed"  # what the experiment loggers record when an exception ends the run
    try:
        with gradient_checkpointing(model, config.gradient_checkpointing), interrupt_flag() as interrupt:
            run.train_model = distributed.wrap(model, device, world, tracker.text, config.distributed)
            if rng is not None:
                set_rng_state(rng)  # last, so that nothing between here and the first step draws from them
            _loop(run, tracker, interrupt)
        result = _result(run)  # the peak memory of the training, before any weights are put back
        if result.ok:
            result.weights = _restore_best(run, tracker) if restore_best else "final"
        status = run.state.status
    finally:
        tracker.close(status)
    return result


def _silent(line: str) -> None:
    pass


def _check_world(world: World, n_examples: int) -> None:
    if world.active and n_examples < world.size:
        raise ConfigError(
            [
                f"{n_examples} training example(s) for {world.size} processes: every process needs at "
                "least one example per step; use fewer processes (--nproc) or more training data"
            ],
            what="distributed training",
        )


def _loop(run: _Run, tracker: Tracker, interrupt: SimpleNamespace) -> None:
    state, plan = run.state, run.plan
    if state.status != "running":
        tracker.text(f"nothing to do: the checkpoint is of a finished run ({state.stop_reason})")
        if state.status in ("completed", "early_stopped") and run.writes:
            # a crash after the last checkpoint, while final/ was written: the checkpoint holds the
            # same weights (restored into the model), so write final/ from them
            if not (run.run_dir / "final" / "training_info.json").is_file():
                save_weights(
                    run.model,
                    run.run_dir / "final",
                    run.adapter,
                    {"step": state.step, "status": state.status},
                )
        distributed.barrier(run.world)
        return
    ranks = f" in each of {run.world.size} processes" if run.world.active else ""
    tracker.text(
        f"training {plan.total_steps} steps of {plan.batch_size} x {plan.grad_accum} examples{ranks} "
        f"({plan.n} training examples) on {run.device}"
        + (", bf16 autocast" if run.config.precision == "bf16" else "")
        + (f", from step {state.step}" if state.step else "")
    )
    if not run.evaluates and run.config.eval_every:
        tracker.text(
            f"train.eval_every is {run.config.eval_every} but fit got no evaluate function: no evaluation"
        )
    run.model.train()
    started, seconds_before = time.perf_counter(), state.train_seconds
    window = SimpleNamespace(losses=[], examples=0, seconds=0.0)
    while state.step < plan.total_steps:
        step_started = time.perf_counter()
        outcome = _train_step(run)
        if outcome is None:  # non-finite: _train_step set status and reason
            tracker.text(state.stop_reason)
            break
        loss_value, grad_norm, examples, skipped = outcome
        state.step += 1
        state.losses.append(loss_value)
        state.train_seconds = seconds_before + time.perf_counter() - started
        if skipped is None:
            state.skips_in_a_row = 0
            window.losses.append(loss_value)
        else:
            state.skipped_steps.append(state.step)
            state.skips_in_a_row += 1
            tracker.text(
                f"step {state.step}/{plan.total_steps}: non-finite {skipped}; skipped its optimizer step "
                f"(train.on_nonfinite: skip): {len(state.skipped_steps)} skipped in all, "
                f"{state.skips_in_a_row} in a row (the run stops after {MAX_SKIPS_IN_A_ROW} in a row)"
            )
        window.examples += examples
        window.seconds += time.perf_counter() - step_started
        tracker.step_done(loss_value, examples / max(time.perf_counter() - step_started, 1e-9))
        if run.config.log_every and (
            state.step % run.config.log_every == 0 or state.step == plan.total_steps
        ):
            if window.losses:  # a window of skipped steps only has no loss to report
                _log_train(run, tracker, window, grad_norm)
            window = SimpleNamespace(losses=[], examples=0, seconds=0.0)
        evaluated = _maybe_evaluate(run, tracker)
        if state.status == "running" and state.step == plan.total_steps:
            state.status, state.stop_reason = "completed", f"completed all {plan.total_steps} steps"
        # agreed on by all ranks (Ctrl-C may reach them at different steps), every step
        interrupted = distributed.any_across(interrupt.requested, run.device, run.world)
        if state.status == "running" and interrupted:
            state.status = "interrupted"
            state.stop_reason = (
                f"interrupted (Ctrl-C) after step {state.step}; fit(..., resume=True) continues"
            )
        save_every = run.config.save_every
        if run.run_dir is not None and (
            evaluated or state.status != "running" or (save_every and state.step % save_every == 0)
        ):
            state.train_seconds = seconds_before + time.perf_counter() - started
            _checkpoint(run, tracker)
        if state.status != "running":
            break
    state.train_seconds = seconds_before + time.perf_counter() - started
    if state.status in ("completed", "early_stopped") and run.writes:
        save_weights(
            run.model, run.run_dir / "final", run.adapter, {"step": state.step, "status": state.status}
        )
    distributed.barrier(run.world)  # no rank returns (and reads final/) before rank 0 wrote it
    if state.status != "diverged":
        tracker.text(f"{state.stop_reason} in {format_seconds(state.train_seconds)}")


def _train_step(run: _Run) -> tuple[float, float, int, str | None] | None:
    """One optimizer step over ``grad_accum`` micro-batches.

    Returns ``(loss, grad_norm, examples, skipped)``: ``skipped`` is None when the update was applied,
    else what was non-finite (``on_nonfinite: skip``). None when the run must stop (status "diverged").
    """
    config, step, world = run.config, run.state.step, run.world
    global_batches = run.plan.step_batches(step)
    batches = run.plan.rank_batches(step, world.rank) if world.active else global_batches
    n_examples = sum(len(indices) for indices in global_batches)
    run.optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=run.device)
    for i, indices in enumerate(batches):
        # each micro-batch weighs by its share of the step's examples (over all ranks): the mean over
        # micro-batches when they are equally large, and the loss of one big batch for a per-example
        # mean loss also when the last batch of an epoch is smaller
        share = len(indices) / n_examples
        if not indices:
            # fewer examples than ranks in this micro-batch: DDP needs a backward pass from every rank,
            # so this one computes the loss of an example it shares with another rank, weighted 0
            indices = global_batches[i][:1]
        # accumulate locally and all-reduce once per step, in the last micro-batch's backward pass
        no_sync = world.active and config.distributed == "ddp" and i < len(batches) - 1
        with run.train_model.no_sync() if no_sync else contextlib.nullcontext():
            batch = to_device(run.collate([run.examples[j] for j in indices]), run.device)
            with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16"):
                value = run.loss(run.train_model, batch)
                if run.hook is not None:
                    value = value + run.hook.loss_penalty()
            _check_loss_tensor(value)
            weighted = value.float() * share
            # DDP averages gradients over ranks; scaled by the world size, the average is the sum of
            # the ranks' weighted losses' gradients: the gradient of the global batch's mean loss
            (weighted * world.size if world.active else weighted).backward()
        total += weighted.detach()
    if world.active and config.distributed == "fsdp":  # the replicated adapter, outside DDP
        distributed.average_gradients([p for g in run.optimizer.param_groups for p in g["params"]], world)
    loss_value = distributed.sum_across(total, world).item()
    if not math.isfinite(loss_value):
        return _nonfinite(run, "loss", loss_value, n_examples)
    params = [p for group in run.optimizer.param_groups for p in group["params"] if p.grad is not None]
    if config.max_grad_norm is not None:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
    else:
        grad_norm = (
            float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))
            if params
            else 0.0
        )
    if not math.isfinite(grad_norm):
        return _nonfinite(run, "gradient norm", grad_norm, n_examples, loss_value)
    run.optimizer.step()
    if run.hook is not None:  # reads this step's gradients, which zero_grad clears at the next step
        run.hook.after_optimizer_step(step + 1)
    run.scheduler.step()
    return loss_value, grad_norm, n_examples, None


def _nonfinite(
    run: _Run, what: str, value: float, n_examples: int, loss_value: float | None = None
) -> tuple[float, float, int, str] | None:
    """Skip the step (``on_nonfinite: skip``, within the limit) or stop the run (None)."""
    state = run.state
    if run.config.on_nonfinite != "skip":
        return _diverged(run, what, value)
    if state.skips_in_a_row >= MAX_SKIPS_IN_A_ROW:
        return _diverged(
            run,
            what,
            value,
            note=f" after {state.skips_in_a_row} skipped steps in a row (train.on_nonfinite: "
            f"skip skips at most {MAX_SKIPS_IN_A_ROW} in a row)",
        )
    run.optimizer.zero_grad(set_to_none=True)
    # the schedule follows the step count, skipped or not, so that the rate at step s stays lr x m(s)
    run.scheduler.step()
    grad_norm = value if what == "gradient norm" else float("nan")
    return (value if loss_value is None else loss_value), grad_norm, n_examples, f"{what} ({value})"


def _check_loss_tensor(value: Any) -> None:
    if not isinstance(value, torch.Tensor) or value.ndim != 0:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise TypeError(
            f"loss(model, batch) must return a scalar tensor; got {shape}. Reduce it (e.g. .mean())."
        )
    if not value.requires_grad:
        raise RuntimeError(
            "loss(model, batch) returned a tensor that does not require grad: did it run under "
            "torch.no_grad(), detach the output, or are no parameters of the model trainable?"
        )


def _diverged(run: _Run, what: str, value: float, applied: bool = False, note: str = "") -> None:
    """Stop the run with status "diverged" and a message naming the step and the fixes to try."""
    state, config = run.state, run.config
    run.optimizer.zero_grad(set_to_none=True)
    root = run.run_dir / "checkpoints" if run.run_dir is not None else None
    last = latest_checkpoint(root) if root is not None and run.world.is_main else None
    kept = (
        f"the last good checkpoint {last} is untouched (resume=True continues from it)"
        if last
        else "no checkpoint had been written"
        if root is not None
        else "nothing was saved (run_dir is None)"
    )
    fixes = [f"a lower learning rate (train.lr, now {config.lr:g})"]
    if config.precision == "bf16":
        fixes.append("full precision (train.precision: fp32)")
    fixes.append(
        "gradient clipping (train.max_grad_norm: 1.0)"
        if config.max_grad_norm is None
        else f"stronger gradient clipping (train.max_grad_norm, now {config.max_grad_norm:g})"
    )
    if applied:
        where = f"after step {state.step} of {run.plan.total_steps}: training stopped and the model's weights are unusable"
    else:
        where = (
            f"at step {state.step + 1} of {run.plan.total_steps}: training stopped before applying it, so the "
            f"model holds the weights after step {state.step}"
        )
    state.status = "diverged"
    state.stop_reason = f"non-finite {what} ({value}){note} {where}; {kept}. Try {', or '.join(fixes)}."
    return None


def _log_train(run: _Run, tracker: Tracker, window: SimpleNamespace, grad_norm: float) -> None:
    state, plan = run.state, run.plan
    loss = sum(window.losses) / len(window.losses)
    lr = run.config.lr * lr_multiplier(
        state.step - 1, schedule=run.config.schedule, warmup=run.warmup, total=plan.total_steps
    )
    speed = window.examples / max(window.seconds, 1e-9)
    left = (plan.total_steps - state.step) * window.seconds / len(window.losses)
    epoch = plan.position_after(state.step - 1)["epoch"]
    tracker.event(
        "train",
        state.step,
        {
            "epoch": epoch,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "examples_per_s": speed,
            "elapsed": state.train_seconds,
        },
    )
    tracker.text(
        f"step {state.step}/{plan.total_steps} | epoch {epoch} | loss {loss:.4f} | lr {lr:.2e} | "
        f"{speed:.1f} ex/s | {format_seconds(state.train_seconds)} elapsed, ~{format_seconds(left)} left"
    )


def _maybe_evaluate(run: _Run, tracker: Tracker) -> bool:
    """Evaluate when due; track the best metric, save ``best/``, and stop early. True if evaluated."""
    state, config = run.state, run.config
    due = (config.eval_every and state.step % config.eval_every == 0) or state.step == run.plan.total_steps
    if not run.evaluates or not due:
        return False
    # rank 0 evaluates the whole validation split and hands the numbers to the other ranks: evaluate()
    # is the user's function over the whole split, and metrics such as F1 or chrF are no mean of
    # per-shard values; the result is that of one process, and every rank decides alike from it
    if run.world.active and config.distributed == "fsdp":
        # the forward pass of a sharded model needs every rank: all evaluate, rank 0's numbers count
        metrics = distributed.broadcast(_evaluate(run), run.world)
    else:
        metrics = distributed.on_main(lambda: _evaluate(run), run.world, f"evaluating at step {state.step}")
    if config.metric not in metrics:
        raise ConfigError(
            [
                f"train.metric is {config.metric!r} but evaluate() returned only "
                f"{sorted(metrics) or 'no numbers'}: set train.metric to one of them"
            ],
            what="evaluation",
        )
    value = metrics[config.metric]
    state.history.append({"step": state.step, **metrics})
    if _better(value, state.best_metric, config.maximize):
        state.best_metric, state.best_step, state.bad_evals = value, state.step, 0
        # an adapter's best weights stay in memory (they are small); a fully fine-tuned model's are read
        # back from best/ at the end: a second copy of the model held through training would raise the
        # run's peak memory by the model's size
        if run.restore_best and (run.adapter is not None or run.run_dir is None):
            run.best_weights = None  # the previous copy goes before the next is made
            run.best_weights = weights_in_memory(run.model, run.adapter)
        if run.writes:
            save_weights(run.model, run.run_dir / "best", run.adapter, {"step": state.step, **metrics})
    else:
        state.bad_evals += 1
    tracker.event("eval", state.step, {**metrics, "elapsed": state.train_seconds})
    shown = " | ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    tracker.text(
        f"eval at step {state.step}: {shown} (best {config.metric} {state.best_metric:.4g} at step {state.best_step})"
    )
    patience = config.early_stopping_patience
    if patience is not None and state.bad_evals >= patience:
        state.status = "early_stopped"
        state.stop_reason = (
            f"stopped early at step {state.step}: {config.metric} did not improve in {patience} "
            f"evaluation(s); best {state.best_metric:.4g} at step {state.best_step}"
        )
    return True


def _evaluate(run: _Run) -> dict[str, float]:
    """``run.evaluate`` on the bare model in eval mode, without grad and away from the training RNG."""
    with (
        preserved_rng(run.device),
        torch.no_grad(),
        torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.config.precision == "bf16"),
    ):
        run.model.eval()
        try:
            metrics = dict(run.evaluate(run.model))
        finally:
            run.model.train()
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float | torch.Tensor) and not isinstance(v, bool)
    }


def _restore_best(run: _Run, tracker: Tracker) -> str:
    """Put the best evaluated weights back into the model at the end of a run; which it then holds."""
    state = run.state
    if state.best_step is None:
        return "final"
    if state.best_step == state.step:
        return "best"  # the model holds them already
    tensors = run.best_weights
    if tensors is None:  # full fine-tuning, or evaluated before a resume: best/ has them; rank 0 reads it
        best = run.run_dir / "best" if run.run_dir is not None else None
        tensors = distributed.on_main(
            lambda: read_weights(best) if best is not None and best.is_dir() else None,
            run.world,
            "reading best/",
        )
        if tensors is None:
            return "final"
    try:
        put_weights(run.model, tensors, run.adapter, source=f"best weights (step {state.best_step})")
    except AdapterMismatchError as exc:
        tracker.text(
            f"best/ (step {state.best_step}) no longer fits the adapter's final shape "
            f"({str(exc).split(':', 1)[0]}); using final/"
        )
        return "final"
    return "best"


def _better(value: float, best: float | None, greater_is_better: bool) -> bool:
    if not math.isfinite(value):
        return False
    return best is None or (value > best if greater_is_better else value < best)


def _checkpoint(run: _Run, tracker: Tracker) -> None:
    state = run.state
    bad = [
        name for name, p in run.model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()
    ]
    if bad:  # never overwrite a good checkpoint with broken weights
        _diverged(run, f"weights in {bad[:3]}", float("nan"), applied=True)
        tracker.text(state.stop_reason)
        return
    trainer_state = {
        **dataclasses.asdict(state),
        "total_steps": run.plan.total_steps,
        "data_position": run.plan.position_after(state.step),
        "resume_key": run.resume_key,
    }
    # every rank's generators (dropout differs per rank), sent to rank 0, which writes the checkpoint
    rng_states = distributed.gather(rng_state(run.device), run.world) if run.world.active else None
    if run.world.is_main:
        save_checkpoint(
            run.run_dir / "checkpoints",
            state.step,
            run.model,
            run.optimizer,
            run.scheduler,
            trainer_state,
            run.device,
            run.adapter,
            rng_states=rng_states,
        )
    distributed.barrier(run.world)  # no rank runs ahead of a checkpoint that may yet fail


def _start(
    run_dir: Path | None,
    resume: bool,
    key: dict[str, Any],
    plan: DataPlan,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    seed: int,
    world: World,
) -> tuple[_State, dict[str, Any] | None]:
    """A fresh state (and seeded generators), or the state and RNG of the newest checkpoint.

    Rank 0 finds and reads the checkpoint; every rank loads what it read, and its own RNG state.
    """
    found = distributed.on_main(
        lambda: _find_checkpoint(run_dir, resume, key, plan, world.size),
        world,
        "looking for the checkpoint to resume from",
    )
    if found is None:
        # dropout masks differ between ranks, as they would between the examples of one process;
        # rank 0 (and a single process) uses the seed itself
        seed_everything(seed + world.rank)
        return _State(), None
    path, saved, files = found
    load_trainable_state(model, files["model"], source=f"checkpoint {path}")
    optimizer.load_state_dict(files["optimizer"])
    scheduler.load_state_dict(files["scheduler"])
    fields = {f.name for f in dataclasses.fields(_State)}
    state = _State(**{k: v for k, v in saved.items() if k in fields})
    if state.status == "interrupted":
        state.status, state.stop_reason = "running", ""
    return state, files["rng"][world.rank]


def _find_checkpoint(
    run_dir: Path | None, resume: bool, key: dict[str, Any], plan: DataPlan, world_size: int
) -> tuple[Path, dict[str, Any], dict[str, Any]] | None:
    """None for a fresh start, else the checkpoint to resume: its path, trainer state and files."""
    root = run_dir / "checkpoints" if run_dir is not None else None
    if root is not None:
        remove_stale_temporaries(root)
        remove_stale_temporaries(run_dir, ("best", "final"))
    latest = latest_checkpoint(root) if root is not None else None
    if not resume:
        if latest is not None:
            raise ConfigError(
                [
                    f"{run_dir} already holds checkpoints of a run (newest: {latest.name}): pass "
                    "resume=True to continue it, or choose a new or empty run_dir"
                ],
                what="fit",
            )
        return None
    if latest is None:
        raise ConfigError(
            [
                f"resume=True but {root} holds no complete checkpoint to resume from: "
                "run without resume to start afresh"
            ],
            what="resume",
        )
    saved = read_trainer_state(latest)
    old = saved.get("resume_key", {})
    problems = [
        f"{name}: the run used {old.get(name, RESUME_KEY_DEFAULTS.get(name))!r}, now {key[name]!r}"
        + (
            f" (set train.greater_is_better: {str(old[name]).lower()} to resume it)"
            if name == "greater_is_better"
            else ""
        )
        for name in key
        if old.get(name, RESUME_KEY_DEFAULTS.get(name)) != key[name]
    ]
    if not problems and saved.get("data_position") != plan.position_after(saved["step"]):
        problems.append(f"data position {saved.get('data_position')} does not match step {saved['step']}")
    if problems:
        problems.append(
            "a resumed run must keep the settings that shape its weights; to change them, start a "
            "new run_dir (e.g. from the best adapter)"
        )
        raise ConfigError(problems, what=f"resume from {latest}")
    return latest, saved, read_checkpoint(latest, world_size)


def _result(run: _Run) -> FitResult:
    state = run.state
    return FitResult(
        steps=state.step,
        losses=list(state.losses),
        history=[dict(h) for h in state.history],
        best_metric=state.best_metric,
        best_step=state.best_step,
        stopped_early=state.status == "early_stopped",
        stop_reason=state.stop_reason,
        train_seconds=state.train_seconds,
        peak_memory_mb=peak_memory_mb(run.device),
        status=state.status,
        run_dir=run.run_dir,
        skipped_steps=list(state.skipped_steps),
        precision=run.config.precision,
    )


def _training_hook(model: nn.Module, adapter: str | None, total_steps: int) -> Any:
    if adapter is None:
        return None
    return state_of(model).configs[adapter].training_hook(model, adapter, total_steps)


def _adapter_of(model: nn.Module, adapter_name: str) -> str | None:
    names = list(state_of(model).configs) if is_adapted(model) else []
    if not names:
        return None
    if adapter_name not in names:
        raise ConfigError(
            [f"adapter_name {adapter_name!r} is not on the model; its adapters: {names}"], what="fit"
        )
    return adapter_name


def _check_arguments(
    config: TrainConfig, examples: Sequence[Any], evaluate: Any, run_dir: Any, resume: bool
) -> None:
    problems = train_config_problems(config)
    if config.on_nonfinite not in ("stop", "skip"):
        problems.append(f"train.on_nonfinite: expected 'stop' or 'skip', got {config.on_nonfinite!r}")
    if len(examples) == 0:
        problems.append("train_examples is empty: give fit at least one training example")
    if resume and run_dir is None:
        problems.append("resume=True needs the run_dir of the run to continue")
    if problems:
        raise ConfigError(problems, what="training config")

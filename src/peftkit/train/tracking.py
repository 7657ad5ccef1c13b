"""Where a run's progress goes: a progress bar, text lines, ``metrics.jsonl`` and the experiment
loggers of ``train.report_to`` (TensorBoard, wandb, MLflow: ``experiment_logging.py``).

``metrics.jsonl`` gets one JSON object per event, flat so that ``pandas.read_json(lines=True)`` reads
it: ``{"event": "train", "step", "epoch", "loss", "lr", "grad_norm", "examples_per_s", "elapsed"}``
every ``log_every`` steps and ``{"event": "eval", "step", "elapsed", <metric>: value ...}`` at every
evaluation. On resume, the events after the checkpoint's step (the work being redone) are dropped
from the file and from TensorBoard (``purge_step``), so both read as one uninterrupted run; wandb and
MLflow continue their run and skip the steps it already holds.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .experiment_logging import finish_loggers, open_loggers, scalars

METRICS_NAME = "metrics.jsonl"


def format_seconds(seconds: float) -> str:
    """``95.2`` -> ``"1m35s"``."""
    if not math.isfinite(seconds):
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _truncate_after(path: Path, step: int) -> None:
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            pass  # a line cut short by a crash
    # written beside and renamed over: a crash during the rewrite leaves the old log, never half of it
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text("".join(f"{line}\n" for line in kept))
    os.replace(temporary, path)


class Tracker:
    """Progress bar, log lines, ``metrics.jsonl`` and experiment loggers for one :func:`peftkit.train.fit` call.

    Args:
        run_dir: Where ``metrics.jsonl`` (and the loggers' files) go; None writes no files and starts
            no logger.
        start_step: Steps already done (resume), 0 for a fresh run.
        total_steps: Optimizer steps of the whole run.
        report_to: Loggers to start (``experiment_logging.reported_to``); ``jsonl`` names this
            tracker's own ``metrics.jsonl``, written in any case.
        progress: Show a tqdm bar (only on a terminal).
        log: Receives text lines; with the default ``print`` and a visible bar they go through the
            bar so that they do not tear it.
        config: The run's settings, which the loggers record.
        summary: The run's parameter counts, which the loggers record.
    """

    def __init__(
        self,
        run_dir: Path | None,
        start_step: int,
        total_steps: int,
        *,
        report_to: Sequence[str] = (),
        progress: bool,
        log: Callable[[str], None],
        config: Mapping[str, Any] | None = None,
        summary: Mapping[str, float] | None = None,
    ) -> None:
        self._file = None
        self._loggers = []
        self._bar = None
        self._log = log
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            # loggers first: one that cannot start (a missing library) leaves no metrics.jsonl behind,
            # which would make the directory look like a run to continue
            self._loggers = open_loggers(report_to, run_dir, start_step, config or {}, summary or {})
            path = run_dir / METRICS_NAME
            try:
                if start_step:
                    _truncate_after(path, start_step)
                self._file = open(path, "a" if start_step else "w")  # noqa: SIM115 (closed in close())
            except BaseException:
                finish_loggers(self._loggers, "failed")
                raise
            for logger in self._loggers:
                if logger.where:
                    log(f"logging to {logger.where}")
        if progress and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
            if log is print:
                self._log = self._bar.write

    def text(self, line: str) -> None:
        self._log(line)

    def step_done(self, loss: float, examples_per_s: float) -> None:
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", ex_s=f"{examples_per_s:.1f}", refresh=False)
            self._bar.update(1)

    def event(self, kind: str, step: int, values: dict[str, Any]) -> None:
        """Write one ``train`` or ``eval`` event to the JSON lines file and every experiment logger."""
        if self._file is not None:
            self._file.write(json.dumps({"event": kind, "step": step, **values}, allow_nan=True) + "\n")
            self._file.flush()
        if self._loggers:
            metrics = scalars(kind, values)
            for logger in self._loggers:
                logger.log(step, metrics)

    def close(self, status: str = "completed") -> None:
        """Close the bar and the file, and finish the loggers' runs with ``status`` (``FitResult.status``,
        or "failed" when an exception ended the run)."""
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        finish_loggers(self._loggers, status)

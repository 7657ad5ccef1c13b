"""Experiment logging: the loggers behind ``train.report_to`` (TensorBoard, Weights & Biases, MLflow).

Each logger answers three calls, made by :class:`peftkit.train.tracking.Tracker` on rank 0 of a run
that has a run directory:

- ``start(config, summary)``, once before the first step: the run's settings as plain data (the whole
  run config when ``fit`` got ``run_config``, else ``{"train": <TrainConfig>}``) and its parameter
  counts (``trainable_params``, ``total_params``, ``trainable_percent``);
- ``log(step, metrics)``, at every event of ``metrics.jsonl``: the same numbers at the same step, named
  ``<event>/<key>`` as TensorBoard names them (``train/loss``, ``train/lr``, ``eval/accuracy`` ...);
- ``finish(status)``, once: the run's status ("completed", "early_stopped", "diverged", "interrupted",
  or "failed" when an exception ended it).

``metrics.jsonl`` is the tracker's own file, written whatever ``report_to`` says: it is the run
directory's record, which a resume rewrites and ``peftkit compare`` reads. ``wandb`` and ``mlflow``
are imported by their logger only, so ``import peftkit`` never loads them.

Resume: wandb and MLflow keep their run id in ``run_dir/experiment_runs.json``; a resumed ``fit``
continues that run and leaves out the steps it already holds (the interrupted run logged them, with
the same values, since a resume replays the same computation).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from ..core.counting import count_parameters
from ..errors import ConfigError
from .config import TrainConfig

TENSORBOARD_DIR = "tensorboard"
RUN_IDS_NAME = "experiment_runs.json"
OK_STATUSES = ("completed", "early_stopped")
# MLflow's limits: names of params and metrics (utils/validation.py), values, params per log_batch call
_MLFLOW_NAME = re.compile(r"[/\w.\- :]{1,250}")
_MLFLOW_VALUE_LENGTH = 6000
_MLFLOW_PARAMS_PER_CALL = 100


class ExperimentLogger(Protocol):
    """What every logger of ``train.report_to`` does (see the module's docstring)."""

    where: str  # one line for the log: where the run can be found ("" says nothing)

    def start(self, config: Mapping[str, Any], summary: Mapping[str, float]) -> None: ...

    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def finish(self, status: str) -> None: ...


def reported_to(config: TrainConfig) -> list[str]:
    """The names ``config`` reports to, in order, without repeats.

    ``report_to: null`` keeps the behaviour from before the field existed: ``metrics.jsonl``, plus
    TensorBoard when ``train.tensorboard`` is true.
    """
    names = config.report_to
    if names is None:
        names = ["jsonl", "tensorboard"] if config.tensorboard else ["jsonl"]
    return list(dict.fromkeys(names))


def parameter_counts(model: nn.Module) -> dict[str, float]:
    """The trainable-parameter summary the loggers record, counted as ``peftkit.trainable_summary`` and
    ``metrics.json`` count: every parameter once (tied weights too), adapters included."""
    trainable, total = count_parameters(model)
    return {
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": round(100.0 * trainable / total if total else 0.0, 4),
    }


def scalars(kind: str, values: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of one ``metrics.jsonl`` event, named as the loggers record them."""
    return {
        f"{kind}/{key}": float(value)
        for key, value in values.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and key != "step"
    }


def open_loggers(
    names: Iterable[str],
    run_dir: Path,
    start_step: int,
    config: Mapping[str, Any],
    summary: Mapping[str, float],
) -> list[ExperimentLogger]:
    """Start a logger for each name but ``jsonl`` (the tracker writes ``metrics.jsonl`` itself).

    Raises:
        ConfigError: a logger's library is missing or cannot open its store.
    """
    started: list[ExperimentLogger] = []
    try:
        for name in names:
            if name != "jsonl":
                logger = LOGGERS[name](run_dir, start_step)
                logger.start(config, summary)
                started.append(logger)
    except BaseException:
        finish_loggers(started, "failed")
        raise
    return started


def finish_loggers(loggers: Iterable[ExperimentLogger], status: str) -> None:
    """``finish`` every logger, also when one of them fails (the first error is raised at the end)."""
    error = None
    for logger in loggers:
        try:
            logger.finish(status)
        except Exception as exc:  # the others still close their runs
            error = error or exc
    if error is not None:
        raise error


class TensorBoardLogger:
    """Scalars in event files under ``run_dir/tensorboard/``."""

    where = ""

    def __init__(self, run_dir: Path, start_step: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ConfigError(
                [
                    f"TensorBoard logging is on (train.report_to or train.tensorboard) but it cannot be "
                    f"imported ({exc}): `pip install tensorboard`, or leave it out (train.report_to "
                    "without tensorboard, or train.tensorboard: false)"
                ],
                what="training setup",
            ) from exc
        # purge_step drops events a crashed run wrote after the checkpoint being resumed from
        self._writer = SummaryWriter(
            str(run_dir / TENSORBOARD_DIR), purge_step=start_step + 1 if start_step else None
        )

    def start(self, config: Mapping[str, Any], summary: Mapping[str, float]) -> None:
        pass  # scalars only, as before report_to existed

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            self._writer.add_scalar(name, value, step)
        self._writer.flush()

    def finish(self, status: str) -> None:
        self._writer.close()


class WandbLogger:
    """A Weights & Biases run whose config is the run's settings plus its parameter counts.

    wandb reads its own environment (``WANDB_MODE=offline``, ``WANDB_API_KEY``, ``WANDB_ENTITY`` ...);
    peftkit sets the project (``WANDB_PROJECT``, else "peftkit"), the run's name (the run directory's
    name) and, unless ``WANDB_DIR`` is set, wandb's directory: ``run_dir/wandb/``.
    """

    def __init__(self, run_dir: Path, start_step: int) -> None:
        self._wandb = _import("wandb", "wandb")
        self._run_dir, self._start_step = run_dir, start_step
        self._run: Any = None
        self.where = ""

    def start(self, config: Mapping[str, Any], summary: Mapping[str, float]) -> None:
        previous = _run_ids(self._run_dir).get("wandb", {}) if self._start_step else {}
        # create_new: a run of our own even when the caller has one open; we log through its object
        self._run = self._wandb.init(
            project=previous.get("project") or os.environ.get("WANDB_PROJECT") or "peftkit",
            name=self._run_dir.name,
            dir=None if os.environ.get("WANDB_DIR") else str(self._run_dir),
            id=previous.get("id"),
            resume="allow" if previous else None,
            reinit="create_new",
        )
        # after init: a resumed run may hold settings that changed since (log_every, eval_every ...)
        self._run.config.update({**config, **summary}, allow_val_change=True)
        _save_run_id(self._run_dir, "wandb", {"id": self._run.id, "project": self._run.project})
        place = self._run.url or f"offline in {Path(self._run.dir).parent} (`wandb sync` uploads it)"
        self.where = f"wandb run {self._run.id}: {place}"

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if step < self._run.step:
            return  # a resumed run: the interrupted one logged this step already
        self._run.log(dict(metrics), step=step)

    def finish(self, status: str) -> None:
        self._run.summary["status"] = status
        self._run.finish(exit_code=0 if status in OK_STATUSES else 1)


class MlflowLogger:
    """An MLflow run: the settings as flat params (``train.lr``, ``adapter.r`` ...) with the parameter
    counts, the metrics by step, and a ``peftkit.status`` tag at the end.

    The store is ``MLFLOW_TRACKING_URI`` when set, else one inside the run directory
    (:func:`mlflow_tracking_uri`); the experiment is ``MLFLOW_EXPERIMENT_NAME``, else "peftkit"; the
    run is named after the run directory. Written through ``MlflowClient``, so the caller's active
    run (``mlflow.start_run``) is left alone.
    """

    def __init__(self, run_dir: Path, start_step: int) -> None:
        _import("mlflow", "mlflow")
        self._run_dir, self._start_step = run_dir, start_step
        self._uri = mlflow_tracking_uri(run_dir)
        self._run_id = ""
        self._logged: dict[str, int] = {}  # metric -> newest step the run holds (a resumed run)
        self.where = ""

    def start(self, config: Mapping[str, Any], summary: Mapping[str, float]) -> None:
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        try:
            self._client = MlflowClient(tracking_uri=self._uri)
            experiment, logged_params = self._open_run()
        except (MlflowException, ImportError) as exc:
            raise ConfigError(
                [
                    f"train.report_to lists mlflow but MLflow cannot open the store {self._uri} "
                    f"({str(exc).strip()}). "
                    "Set MLFLOW_TRACKING_URI to a tracking server (http://...) or a database, or "
                    "MLFLOW_ALLOW_FILE_STORE=true for a file store in the run directory; the default "
                    "SQLite store there needs the full package (`pip install mlflow`: mlflow-skinny, "
                    "which peftkit[tracking] installs, has no SQLite backend)"
                ],
                what="training setup",
            ) from exc
        params = [
            Param(key, value)
            for key, value in flat_params({**config, **summary}).items()
            if key not in logged_params
        ]  # an MLflow param cannot change: a resumed run keeps the first
        for i in range(0, len(params), _MLFLOW_PARAMS_PER_CALL):
            self._client.log_batch(self._run_id, params=params[i : i + _MLFLOW_PARAMS_PER_CALL])
        self.where = f"mlflow run {self._run_id} in experiment {experiment!r} at {self._uri}"

    def _open_run(self) -> tuple[str, Mapping[str, str]]:
        """The run to log to: the interrupted one on resume, else a new one. Its experiment and params."""
        from mlflow.exceptions import MlflowException

        client = self._client
        previous = _run_ids(self._run_dir).get("mlflow", {}) if self._start_step else {}
        if previous.get("tracking_uri") == self._uri:
            try:
                run = client.get_run(previous["run_id"])
            except MlflowException:
                run = None  # deleted since: start a new one
            if run is not None:
                self._run_id = run.info.run_id
                client.update_run(self._run_id, status="RUNNING")
                self._logged = {
                    key: max(m.step for m in client.get_metric_history(self._run_id, key))
                    for key in run.data.metrics
                }
                return client.get_experiment(run.info.experiment_id).name, run.data.params
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "peftkit"
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            try:
                experiment_id = client.create_experiment(name)
            except MlflowException:  # created by another process in between
                experiment_id = client.get_experiment_by_name(name).experiment_id
        run = client.create_run(
            experiment_id, run_name=self._run_dir.name, tags={"peftkit.run_dir": str(self._run_dir)}
        )
        self._run_id = run.info.run_id
        _save_run_id(self._run_dir, "mlflow", {"tracking_uri": self._uri, "run_id": self._run_id})
        return name, {}

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(name, value, now, step)
            for name, value in metrics.items()
            if step > self._logged.get(name, -1)
        ]
        if batch:
            self._client.log_batch(self._run_id, metrics=batch)

    def finish(self, status: str) -> None:
        self._client.set_tag(self._run_id, "peftkit.status", status)
        state = "FINISHED" if status in OK_STATUSES else "KILLED" if status == "interrupted" else "FAILED"
        self._client.set_terminated(self._run_id, state)


LOGGERS = {"tensorboard": TensorBoardLogger, "wandb": WandbLogger, "mlflow": MlflowLogger}


def mlflow_tracking_uri(run_dir: Path) -> str:
    """``MLFLOW_TRACKING_URI`` when set; else a store inside the run directory, so that a run keeps its
    records with it: ``file:run_dir/mlruns`` when ``MLFLOW_ALLOW_FILE_STORE`` is true (recent MLflow
    refuses file stores without it), else MLflow's own default backend, ``sqlite:///run_dir/mlflow.db``.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower() in ("1", "true"):
        return (run_dir.resolve() / "mlruns").as_uri()
    return f"sqlite:///{(run_dir.resolve() / 'mlflow.db').as_posix()}"


def flat_params(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 0.001}}`` -> ``{"train.lr": "0.001"}``: nested sections become dotted names.

    A mapping whose keys MLflow cannot take as names (``rank_pattern``'s regexes) stays one JSON value.
    """
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if (
            isinstance(value, Mapping)
            and value
            and all(isinstance(k, str) and _MLFLOW_NAME.fullmatch(f"{name}.{k}") for k in value)
        ):
            out.update(flat_params(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out[name] = text[:_MLFLOW_VALUE_LENGTH]
    return out


def _import(module: str, package: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(
            [
                f"train.report_to lists {package} but it cannot be imported ({exc}): "
                f"`pip install {package}`, or remove {package} from train.report_to"
            ],
            what="training setup",
        ) from exc


def _run_ids(run_dir: Path) -> dict[str, Any]:
    """What ``experiment_runs.json`` holds: {"wandb": {"id", "project"}, "mlflow": {"tracking_uri", "run_id"}}."""
    try:
        ids = json.loads((run_dir / RUN_IDS_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return ids if isinstance(ids, dict) else {}


def _save_run_id(run_dir: Path, logger: str, value: dict[str, str]) -> None:
    path = run_dir / RUN_IDS_NAME
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps({**_run_ids(run_dir), logger: value}, indent=2) + "\n")
    os.replace(temporary, path)  # a crash leaves the old file or the new one

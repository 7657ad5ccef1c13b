"""Run a comparison: every planned run in its own process, one after another, then the report.

The comparison's directory holds::

    compare.yaml                 the comparison config as given (after overrides)
    records/<name>-seed<s>.json  one record per finished run (peftkit.compare.worker)
    runs/<name>/seed-<s>/        each run's own directory (config, metrics, adapter or model, curves)
    logs/<name>-seed<s>.log      each run's output
    probe/                       the base model's behaviour probe, computed once
    report.md, report.html       the summary (peftkit.report)

A record is written last, atomically, and carries a hash of its run config: running the comparison
again skips every run whose record is finished and current, so an interrupted comparison continues
where it stopped and loses at most the run in flight.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..core.registry import DEFAULT_METHOD
from ..train.tracking import format_seconds
from .config import CompareConfig, PlannedRun
from .measure import BASELINE_FILE, baseline, probe_cache_path, python_command
from .worker import OK_STATUSES

FINISHED = (*OK_STATUSES, "diverged")  # a diverged run is a result (the method's), not a failure to retry
POLL_SECONDS = 0.5
Log = Callable[[str], None]


@dataclass
class CompareResult:
    """What :func:`run_comparison` did.

    Attributes:
        output_dir: The comparison's directory.
        records: Every current record, in plan order (finished, diverged or failed).
        ran: Labels of the runs trained by this call; ``skipped`` those whose record was current.
        failed: Labels of the runs without a usable result (their logs say why).
        report: The Markdown and HTML reports, when written.
    """

    output_dir: Path
    records: list[dict[str, Any]]
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    report: dict[str, Path] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed


def record_path(output_dir: Path, run: PlannedRun) -> Path:
    return output_dir / "records" / f"{run.name}-seed{run.seed}.json"


def read_record(path: Path) -> dict[str, Any] | None:
    """The record at ``path``, or None when there is none or it cannot be read."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_current(record: dict[str, Any] | None, run: PlannedRun) -> bool:
    """The record finished and was made from exactly this run config."""
    return bool(record) and record.get("key") == run.key and record.get("status") in FINISHED


def run_comparison(
    config: CompareConfig, *, log: Log = print, progress: bool = True, report: bool = True
) -> CompareResult:
    """Train and measure every run of ``config`` that has no current record, then write the report.

    Args:
        config: A checked comparison (:func:`peftkit.compare.load_compare_config`).
        log: Where progress lines go.
        progress: Show a progress bar per run (on a terminal).
        report: Write ``report.md`` and ``report.html`` at the end.
    """
    out = config.output_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.yaml").write_text(yaml.safe_dump(config.source, sort_keys=False, allow_unicode=True))
    if config.runs:
        floor = baseline(config.runs[0].config)  # every run has the same data: once, from the data alone
        if floor is not None:
            (out / BASELINE_FILE).write_text(json.dumps(floor, indent=1) + "\n")
    if config.tuning:
        config = _tuned(config, progress, log)
    todo = [run for run in config.runs if not is_current(read_record(record_path(out, run)), run)]
    result = CompareResult(out, [], skipped=[r.label for r in config.runs if r not in todo])
    if result.skipped:
        log(
            f"{len(result.skipped)} of {len(config.runs)} runs already done (records in {out / 'records'}); "
            f"{len(todo)} to go"
        )
    durations: dict[str, list[float]] = {}
    for index, run in enumerate(todo):
        left = _time_left(todo[index:], durations)
        log(
            f"[{index + 1}/{len(todo)}] {run.label}: {run.config.adapter.get('method', DEFAULT_METHOD)}"
            + (f" (about {format_seconds(left)} left in all)" if left is not None else "")
        )
        started = time.perf_counter()
        record = _run_in_process(config, run, todo[index + 1 :], durations, progress, log)
        durations.setdefault(run.name, []).append(time.perf_counter() - started)
        result.ran.append(run.label)
        if record is None or record.get("status") not in FINISHED:
            result.failed.append(run.label)
            why = record.get("error") if record else "the process ended without a record"
            log(f"    {run.label} FAILED: {why}; see {_log_path(out, run)}")
        else:
            log(f"    {_one_line(record)}")
    result.records = [r for r in (read_record(record_path(out, run)) for run in config.runs) if r is not None]
    result.failed = sorted(
        set(result.failed)
        | {f"{r['name']} seed {r['seed']}" for r in result.records if r.get("status") not in FINISHED}
    )
    if report and result.records:
        from ..report import write_report

        result.report = write_report(out, result.records, config, **report_extras(out))
    return result


def report_extras(out: Path) -> dict[str, Any]:
    """What a comparison's directory holds for its report besides the records: the learning-rate searches
    (``tuning.json``) and the task's floor (``baseline.json``)."""
    from .tune import read_outcomes

    floor = read_record(out / BASELINE_FILE)
    return {"outcomes": read_outcomes(out), "baseline": floor if isinstance(floor, dict) else None}


def _run_in_process(
    config: CompareConfig,
    run: PlannedRun,
    queued: list[PlannedRun],
    durations: dict[str, list[float]],
    progress: bool,
    log: Log,
    record_file: Path | None = None,
    log_file: Path | None = None,
    measure: bool = True,
) -> dict[str, Any] | None:
    out = config.output_dir
    run_dir = Path(run.config.output_dir)
    if run_dir.exists():  # a run cut short earlier: start it over, so its measurements cover one whole run
        if out not in run_dir.parents:
            raise RuntimeError(f"refusing to delete {run_dir}: not inside {out}")
        shutil.rmtree(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    job_path = run_dir.parent / f"{run_dir.name}.job.json"
    run_config = run_dir.parent / f"{run_dir.name}.yaml"
    from ..run.config import dump_config

    dump_config(run.config, run_config)
    record_file = record_file or record_path(out, run)
    job = {
        "config": str(run_config),
        "record": str(record_file),
        "name": run.name,
        "seed": run.seed,
        "key": run.key,
        "probe_cache": str(probe_cache_path(out / "probe", run.config, config.probe_examples)),
        "probe_examples": config.probe_examples if measure else 0,
        "latency_repeats": config.latency_repeats,
        "measure": measure,
    }
    job_path.write_text(json.dumps(job, indent=1))
    record_file.parent.mkdir(parents=True, exist_ok=True)
    record_file.unlink(missing_ok=True)  # a stale or failed record must not pass for this run's
    log_file = log_file or _log_path(out, run)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")] if p
    )
    bar = _Bar(run, progress)
    started = time.perf_counter()
    with log_file.open("w") as sink:
        process = subprocess.Popen(
            [*python_command(), str(job_path)], stdout=sink, stderr=subprocess.STDOUT, env=env
        )
        try:
            while process.poll() is None:
                time.sleep(POLL_SECONDS)
                queued_left = _time_left(queued, durations)
                bar.update(_last_step(run_dir), time.perf_counter() - started, queued_left)
        except KeyboardInterrupt:
            process.terminate()
            process.wait()
            raise
        finally:
            bar.close()
    if process.returncode != 0:
        tail = log_file.read_text(errors="replace").strip().splitlines()[-5:]
        log("    " + "\n    ".join(tail))
    return read_record(record_file)


def _tuned(config: CompareConfig, progress: bool, log: Log) -> CompareConfig:
    """``config`` with every tuned run set to the values its search chose (trials run first, resumably)."""
    from .tune import run_searches

    durations: dict[str, list[float]] = {}

    def run_one(run: PlannedRun, record_file: Path, label: str) -> dict[str, Any] | None:
        started = time.perf_counter()
        log_file = config.output_dir / "logs" / "tune" / record_file.with_suffix(".log").name
        record = _run_in_process(
            config, run, [], durations, progress, log, record_file, log_file, measure=False
        )
        durations.setdefault(run.name, []).append(time.perf_counter() - started)
        if record is None or record.get("status") not in FINISHED:
            log(f"    {label} FAILED: {(record or {}).get('error', 'no record')}; see {log_file}")
        return record

    outcomes = run_searches(config, run_one, log)
    return config.with_choices({name: o["chosen"] for name, o in outcomes.items() if o.get("chosen")})


def _log_path(out: Path, run: PlannedRun) -> Path:
    return out / "logs" / f"{run.name}-seed{run.seed}.log"


def _last_step(run_dir: Path) -> int:
    """The newest step the run's ``metrics.jsonl`` reports (0 before the first log line)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line).get("step", 0))
        except (json.JSONDecodeError, ValueError, TypeError):
            continue
    return 0


def _time_left(runs: list[PlannedRun], durations: dict[str, list[float]]) -> float | None:
    """Estimated seconds for ``runs``: each as long as its method's finished runs took (or all runs')."""
    every = [d for ds in durations.values() for d in ds]
    if not runs:
        return 0.0
    if not every:
        return None
    return sum(statistics.mean(durations.get(run.name) or every) for run in runs)


class _Bar:
    """A progress bar for the run in flight: its steps, and the time left for the whole comparison."""

    def __init__(self, run: PlannedRun, enabled: bool) -> None:
        self._bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=run.config.train.steps,
                desc=f"  {run.label}",
                unit="step",
                dynamic_ncols=True,
                leave=False,
            )
        self._step = 0

    def update(self, step: int, elapsed: float, queued_left: float | None) -> None:
        if self._bar is None:
            return
        if step > self._step:
            self._bar.update(step - self._step)
            self._step = step
        total = self._bar.total
        if queued_left is not None and total and step:
            run_left = elapsed * (total - step) / step
            self._bar.set_postfix_str(
                f"all runs: ~{format_seconds(run_left + queued_left)} left", refresh=True
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _one_line(record: dict[str, Any]) -> str:
    test = record.get("test") or {}
    metric = record.get("metric")
    shown = (
        f"test {metric} {test[metric]:.4f}"
        if isinstance(test.get(metric), float)
        else f"status {record.get('status')}"
    )
    return (
        f"{record['name']} seed {record['seed']}: {shown}, {record.get('trainable_params', 0):,} trainable, "
        f"{format_seconds(record.get('train_seconds') or 0)} training, peak {record.get('peak_memory_mb') or 0:.0f} MB"
    )

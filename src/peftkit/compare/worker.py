"""One run of a comparison, in its own process: ``python -m peftkit.compare.worker JOB.json``.

A fresh process per run makes the peak resident memory (``ru_maxrss``) that run's own, and a crash
(out of memory, a kill) costs only that run. The job file names the run config, the record to write
and the measurement settings; the worker trains with :func:`peftkit.run.runner.train_run`, reloads the
saved result from disk (so every measurement is of what a user would load), measures it
(``peftkit.compare.measure``) and writes the record atomically as its last act: a record on disk
always describes a whole run.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

RECORD_FORMAT = 1
OK_STATUSES = ("completed", "early_stopped")


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train and measure the run described by ``job``; returns (and writes) its record."""
    from ..run.config import load_config, to_dict
    from ..run.runner import ADAPTER_DIR, FULL_MODEL_DIR, build_task, is_full_fine_tuning, load_run, train_run
    from ..train.runtime import resolve_device
    from . import measure

    config = load_config(job["config"])
    started, clock = _now(), time.perf_counter()
    record: dict[str, Any] = {
        "format": RECORD_FORMAT,
        "name": job["name"],
        "seed": job["seed"],
        "key": job["key"],
        "task": config.task,
        "model": config.model.name_or_path,
        "method": None,
        "metric": config.train.metric,
        "greater_is_better": config.train.maximize,
        "config": to_dict(config),
        "versions": measure.versions(),
        "machine": measure.machine(),
        "started_at": started,
    }
    result = train_run(config, log=print)
    metrics = result.metrics
    full = is_full_fine_tuning(config)
    run_dir = Path(config.output_dir)
    curves = measure.curves(run_dir, config.train.metric)
    record.update(
        method=metrics["method"],
        status=metrics.get("status", "completed"),
        stop_reason=metrics.get("stop_reason"),
        trainable_params=metrics["trainable_params"],
        total_params=metrics["total_params"],
        trainable_percent=100.0 * metrics["trainable_params"] / max(metrics["total_params"], 1),
        steps=metrics.get("steps"),
        best_step=metrics.get("best_step"),
        best_validation=metrics.get("best_validation"),
        train_seconds=metrics.get("train_seconds"),
        peak_memory_mb=metrics.get("peak_memory_mb"),
        examples_per_s=measure.median_throughput(curves["train"]),
        curves=curves,
        examples_per_step=config.train.batch_size * config.train.grad_accum,
        test=metrics.get("test"),
    )
    if record["status"] in OK_STATUSES and job.get("measure", True):  # a tuning trial needs its curves only
        artifact = run_dir / (FULL_MODEL_DIR if full else ADAPTER_DIR)
        record.update(artifact=artifact.name, artifact_bytes=measure.directory_bytes(artifact))
        loaded = load_run(run_dir)
        loaded.model.to(resolve_device(config.train.device))
        splits = loaded.task.load_data()
        test = splits.get("test") or splits.get("validation") or []
        if job["probe_examples"]:
            try:
                record["forgetting"] = measure.forgetting(
                    loaded.task,
                    build_task(loaded.config),
                    loaded.model,
                    Path(job["probe_cache"]),
                    job["probe_examples"],
                    config.eval.batch_size,
                )
            except (ImportError, ValueError, RuntimeError) as exc:  # e.g. the general text is not installed
                record["forgetting"] = {"error": str(exc)}
        if test:
            record["latency_ms"] = measure.latency(
                loaded.task, loaded.model, test[: config.eval.batch_size], job["latency_repeats"], full
            )
    record.update(finished_at=_now(), wall_seconds=time.perf_counter() - clock)
    write_record(Path(job["record"]), record)
    return record


def write_record(path: Path, record: dict[str, Any]) -> None:
    """Write ``record`` as JSON, atomically (a reader sees the old file or the whole new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(record, indent=1, allow_nan=True, default=str) + "\n")
    os.replace(temporary, path)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(
            "usage: python -m peftkit.compare.worker JOB.json (started by `peftkit compare`)", file=sys.stderr
        )
        return 2
    job = json.loads(Path(args[0]).read_text())
    try:
        run_job(job)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # recorded, so the report can say which run failed and why
        from ..run.config import load_config

        traceback.print_exc()
        try:
            config = load_config(job["config"])
            task = config.task
        except Exception:
            task = None
        write_record(
            Path(job["record"]),
            {
                "format": RECORD_FORMAT,
                "name": job["name"],
                "seed": job["seed"],
                "key": job["key"],
                "task": task,
                "status": "failed",
                "error": f"{type(exc).__name__}: {exc}",
                "finished_at": _now(),
            },
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

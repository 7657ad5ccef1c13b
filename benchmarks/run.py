"""The benchmark driver: ``python -m benchmarks.run [--reps N] [--steps N] [--only CASE] [--device cuda]``.

Runs every (case, library) of the suite once per repetition, each in a fresh process
(``python -m benchmarks.worker``), interleaving the libraries: within a repetition every case runs
peftkit then the reference library (A B), and the repetitions follow one another (A B A B ...), so
slow drift of the machine's load hits both sides of every pair alike. Writes one JSON file per suite
run (every raw sample, the summary, versions, machine) and prints the Markdown tables.

``make bench`` runs the default suite on this machine's 2 cores in under 15 minutes; see
``docs/performance.md`` for the numbers and how to read them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fnmatch
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import summarise
from benchmarks.cases import WEIGHTS, Case, Job, default_cases

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
JOB_TIMEOUT_S = 900  # one process; far above any case here, it only stops a hung worker


def select(cases: list[Case], only: list[str] | None) -> list[Case]:
    """The cases whose name matches one of ``only`` (exact names or shell patterns such as ``train-*``).

    Raises:
        SystemExit: a pattern matches no case (the message lists the case names).
    """
    if not only:
        return cases
    patterns = [p for item in only for p in item.split(",") if p]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(c.name, p) for c in cases)]
    if unmatched:
        names = ", ".join(c.name for c in cases)
        raise SystemExit(f"--only {', '.join(unmatched)} matches no case; the cases are: {names}")
    return [c for c in cases if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]


def schedule(cases: list[Case], reps: int, **job_fields: Any) -> list[Job]:
    """Jobs in run order: repetition by repetition, case by case, the libraries of a case back to back."""
    return [Job(case, lib, rep, **job_fields) for rep in range(reps) for case in cases for lib in case.libs]


def estimate_left(done: list[tuple[Job, float]], left: list[Job]) -> float:
    """Seconds the ``left`` jobs should take, from the durations of the finished ones: the mean of the
    same (case, library) if one ran, else of the same case, else of all."""
    if not done:
        return 0.0
    by_pair: dict[tuple[str, str], list[float]] = {}
    by_case: dict[str, list[float]] = {}
    for job, seconds in done:
        by_pair.setdefault((job.case.name, job.lib), []).append(seconds)
        by_case.setdefault(job.case.name, []).append(seconds)
    overall = sum(s for _, s in done) / len(done)
    total = 0.0
    for job in left:
        seconds = by_pair.get((job.case.name, job.lib)) or by_case.get(job.case.name)
        total += sum(seconds) / len(seconds) if seconds else overall
    return total


def stop_before(job: Job, done: list[tuple[Job, float]], budget_s: float | None, elapsed_s: float) -> bool:
    """True when ``job`` starts a new repetition that would not fit in ``budget_s``, judged by the mean
    duration of the repetitions so far. Only whole repetitions run, so every pair stays complete."""
    if budget_s is None or not done or done[-1][0].rep == job.rep:
        return False
    per_rep = sum(seconds for _, seconds in done) / (done[-1][0].rep + 1)
    return elapsed_s + per_rep > budget_s


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s"


def headline(record: dict[str, Any]) -> str:
    """The one-line result of a finished process, for the progress line."""
    if not record.get("ok"):
        return f"FAILED: {record.get('error')}"
    m = record.get("metrics", {})
    if "step_s" in m:
        return f"{m['step_s']:.3f} s/step, peak {m['peak_mb']:.0f} MB (+{m['overhead_mb']:.0f} MB training)"
    if "unmerged_s" in m:
        return (
            f"base {1e3 * m['base_s']:.1f} ms, unmerged {m['unmerged_overhead']:+.1%}, "
            f"merged {m['merged_overhead']:+.1%}, save {1e3 * m['save_s']:.0f} ms, load {1e3 * m['load_s']:.0f} ms"
        )
    if "single_s" in m:
        mixed = "n/a" if m.get("mixed_s") is None else f"{1e3 * m['mixed_s']:.1f} ms"
        return f"single {1e3 * m['single_s']:.1f} ms, mixed {mixed}"
    return "done"


def snapshot_source(workdir: Path) -> Path | None:
    """A copy of ``src/`` that every worker imports peftkit from, so that edits landing in the shared
    tree during a long run cannot mix two versions of peftkit into one suite."""
    source = ROOT / "src"
    if not (source / "peftkit").is_dir():
        return None
    target = workdir / "src"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return target


def run_job(
    job: Job, python: str, workdir: Path, timeout: float = JOB_TIMEOUT_S, source: Path | None = None
) -> dict[str, Any]:
    """Run ``job`` in a fresh ``python -m benchmarks.worker`` process; its record (or a failure record).

    ``source``: where the worker imports peftkit from (default: this checkout's ``src/``)."""
    stem = f"{job.case.name}-{job.lib}-{job.rep}"
    job_file, out_file = workdir / f"{stem}.job.json", workdir / f"{stem}.out.json"
    job_file.write_text(json.dumps(job.to_dict()))
    threads = str(job.threads)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONWARNINGS": "ignore",
    }
    # the worker imports `benchmarks` from the repository root and peftkit from src/ when not installed
    src = str(source or ROOT / "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, str(ROOT), env.get("PYTHONPATH")]))
    try:
        proc = subprocess.run(
            [python, "-m", "benchmarks.worker", str(job_file), str(out_file)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        stderr, code = proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        stderr, code = f"timed out after {timeout:.0f} s\n{exc.stderr or ''}", None
    if out_file.is_file():
        return json.loads(out_file.read_text())
    return {
        "case": job.case.name,
        "lib": job.lib,
        "rep": job.rep,
        "ok": False,
        "error": f"worker exited with {code} without a record; stderr ends: {stderr[-1500:]}",
    }


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def meta(args: argparse.Namespace, started: dt.datetime) -> dict[str, Any]:
    """Versions, machine and settings of this suite run."""
    from peftkit.compare.measure import cpu_model

    cpu = cpu_model()
    # the commit the snapshot of src/ (see snapshot_source) is taken from, a moment later
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--", "src", "benchmarks")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "device": args.device,
        "weights": args.weights,
        "threads": args.threads,
        "reps": args.reps,
        "steps": args.steps,
        "versions": {
            name: _version(name) for name in ("torch", "transformers", "peft", "peftkit", "safetensors")
        },
        "peftkit_commit": (commit + (" (uncommitted changes in src/ or benchmarks/)" if dirty else ""))
        if commit
        else "unknown (no git checkout here)",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average_at_start": load,
    }


def default_output(args: argparse.Namespace, started: dt.datetime) -> Path:
    tag = args.device if args.weights == "real" else f"{args.device}-{args.weights}"
    return RESULTS / f"{tag}-{started.strftime('%Y%m%d-%H%M')}.json"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--reps",
        type=int,
        default=2,
        help="repetitions of every (case, library), each in a fresh process (default 2; the steady "
        "state comes from the timed steps within each process)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps (train) or rounds (infer, mixed) per process, for every case "
        "(default: each case's own, sized for the 15-minute CPU budget)",
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed warm-up steps or rounds per process"
    )
    parser.add_argument("--only", action="append", help="case names or patterns (train-minilm-*), repeatable")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument(
        "--weights",
        choices=WEIGHTS,
        default="real",
        help="real: the bundled pretrained models; random: the same architectures from "
        "benchmarks/gpu_configs with random weights; tiny: shrunk models (tests)",
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="torch intra-op threads per process (default 2)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results file (default benchmarks/results/<device>-<date>.json)",
    )
    parser.add_argument("--python", default=sys.executable, help="interpreter for the worker processes")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="time budget: start another repetition only if the mean repetition so far still "
        "fits (--reps is then a maximum; at least one repetition always runs)",
    )
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    parser.add_argument("--quiet", action="store_true", help="no Markdown tables at the end")
    args = parser.parse_args(argv)
    if (
        args.reps < 1
        or (args.steps is not None and args.steps < 1)
        or (args.warmup is not None and args.warmup < 0)
    ):
        parser.error("--reps and --steps must be at least 1, --warmup at least 0")
    return args


def main(argv: list[str] | None = None) -> Path | None:
    """Run the suite; returns the results file."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cases = select(default_cases(), args.only)
    if args.list:
        for case in cases:
            print(
                f"{case.name:<26} {case.kind:<6} {case.model:<8} {case.method:<5} {case.targets:<4} "
                f"libs={','.join(case.libs)} timed={case.timed} warmup={case.warmup}"
            )
        return None
    options = {k: v for k, v in (("timed", args.steps), ("warmup", args.warmup)) if v is not None}
    jobs = schedule(
        cases, args.reps, device=args.device, weights=args.weights, threads=args.threads, options=options
    )
    started = dt.datetime.now(dt.timezone.utc)
    out = args.out or default_output(args, started)
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "meta": meta(args, started),
        "cases": [c.to_dict() for c in cases],
        "records": [],
    }
    done: list[tuple[Job, float]] = []
    clock_start = time.perf_counter()
    print(
        f"{len(jobs)} processes ({len(cases)} cases x {args.reps} repetitions); results -> {out}", flush=True
    )
    with tempfile.TemporaryDirectory(prefix="peftkit-bench-") as tmp:
        source = snapshot_source(Path(tmp))
        for index, job in enumerate(jobs):
            if stop_before(job, done, args.budget_s, time.perf_counter() - clock_start):
                result["meta"]["stopped"] = (
                    f"after {job.rep} repetition(s): another would overrun --budget-s {args.budget_s:.0f}"
                )
                print(f"stopping: {result['meta']['stopped']}", flush=True)
                break
            began = time.perf_counter()
            record = run_job(job, args.python, Path(tmp), source=source)
            seconds = time.perf_counter() - began
            record["wall_s"] = seconds
            result["records"].append(record)
            done.append((job, seconds))
            left = estimate_left(done, jobs[index + 1 :])
            print(
                f"[{index + 1}/{len(jobs)}] {job.case.name} {job.lib} rep {job.rep + 1}/{args.reps}: "
                f"{headline(record)} ({seconds:.1f} s; ~{_clock(left)} left)",
                flush=True,
            )
            out.write_text(
                json.dumps(result, indent=1)
            )  # after every process: an interrupted run keeps its samples
    result["meta"]["reps_done"] = len({r["rep"] for r in result["records"]})
    result["meta"]["duration_s"] = (dt.datetime.now(dt.timezone.utc) - started).total_seconds()
    result["meta"]["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    first = next((r for r in result["records"] if r.get("ok")), {})
    result["meta"]["worker_env"] = first.get("env")
    result["summary"] = summarise.summarise(result["records"], result["cases"])
    out.write_text(json.dumps(result, indent=1))
    if not args.quiet:
        print()
        print(summarise.markdown(result), end="")
    print(f"\nwrote {out} ({_clock(result['meta']['duration_s'])})")
    return out


if __name__ == "__main__":
    main()

"""What ``peftkit compare`` measures on a finished run, besides what training itself recorded.

- **Latency**: one forward pass (with the task's loss) on a batch of ``eval.batch_size`` test examples,
  in eval mode without gradients, after two warm-up calls; the median of ``repeats`` timed calls. The
  base model (adapters disabled) and the unmerged adapter are timed alternately, so both see the same
  machine load; then the adapter is merged and timed again. A full fine-tune is a base-sized model
  without adapters: its one figure fills all three columns.
- **Forgetting**: the task's behaviour probe (``peftkit.tasks.probes``) on the base model and on the
  tuned one. The base probe is computed once per comparison and cached.
- **Artifact size**: the bytes of the saved adapter directory (``adapter/``), or of the saved model
  (``model/``) for full fine-tuning.
- **Curves**: the training loss and validation metrics by step, from the run's ``metrics.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import api
from ..tasks.probes import BehaviourProbe, behaviour_change

WARMUP_CALLS = 2


def versions() -> dict[str, str]:
    """Versions of Python and the libraries that decide speed and results."""
    import transformers

    from .. import __version__

    return {
        "peftkit": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """The machine a run measured on: CPU model, cores, torch threads, accelerator."""
    cpu = cpu_model()
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def directory_bytes(path: Path) -> int:
    """Total size of the files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _median_ms(call: Callable[[], Any], repeats: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def latency(task: Any, model: nn.Module, examples: Sequence[Any], repeats: int, full: bool) -> dict[str, Any]:
    """Milliseconds per forward pass on one batch of ``examples``: base, unmerged and merged.

    Leaves the model merged when merging was possible.
    """
    batch = task.collate(list(examples))
    device = next(model.parameters()).device

    def forward() -> None:
        with torch.no_grad():
            task.loss(model, batch)

    was_training = model.training
    model.eval()
    out: dict[str, Any] = {"batch_size": len(examples), "repeats": repeats}
    try:
        for _ in range(WARMUP_CALLS):
            forward()
        if full:
            ms = statistics.median(_median_ms(forward, repeats, device))
            return {**out, "base": ms, "unmerged": ms, "merged": ms}
        base, unmerged = [], []
        for _ in range(repeats):  # alternate, so that both see the same machine load
            with api.disable(model):
                base += _median_ms(forward, 1, device)
            unmerged += _median_ms(forward, 1, device)
        out.update(base=statistics.median(base), unmerged=statistics.median(unmerged))
        try:
            api.merge(model)
        except (ValueError, TypeError) as exc:  # e.g. a soft prompt changes inputs, not weights
            out.update(merged=None, merged_note=str(exc).split(";")[0])
            return out
        forward()
        out["merged"] = statistics.median(_median_ms(forward, repeats, device))
        return out
    finally:
        model.train(was_training)


def probe_cache_path(directory: Path, config: Any, n: int) -> Path:
    """Where the base model's probe for this task, model and data is cached."""
    key = json.dumps(
        {"task": config.task, "model": vars(config.model), "data": repr(config.data), "n": n},
        sort_keys=True,
        default=str,
    )
    return directory / f"base-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


def base_probe(task: Any, cache: Path, n: int, batch_size: int) -> BehaviourProbe:
    """The base model's behaviour probe, from ``cache`` or computed on a freshly loaded base model."""
    if cache.is_file():
        saved = torch.load(cache, map_location="cpu", weights_only=True)
        return BehaviourProbe(saved["kind"], saved["source"], saved.get("value"), saved.get("features"))
    model = task.load_model()
    probe = task.behaviour_probe(model, n, batch_size)
    cache.parent.mkdir(parents=True, exist_ok=True)
    temporary = cache.with_name(cache.name + ".tmp")
    torch.save(
        {"kind": probe.kind, "source": probe.source, "value": probe.value, "features": probe.features},
        temporary,
    )
    os.replace(temporary, cache)
    return probe


def forgetting(
    task: Any, base_task: Any, model: nn.Module, cache: Path, n: int, batch_size: int
) -> dict[str, Any]:
    """How far the tuned ``model`` moved from the base on held-out inputs (see ``peftkit.tasks.probes``).

    ``base_task`` is a fresh task of the same run: it loads the base model when ``cache`` has no probe.
    """
    if not hasattr(task, "behaviour_probe"):
        return {"error": f"the {task.name} task has no behaviour probe"}
    base = base_probe(base_task, cache, n, batch_size)
    return behaviour_change(base, task.behaviour_probe(model, n, batch_size))


def curves(run_dir: Path, metric: str) -> dict[str, list[list[float]]]:
    """``{"train": [[step, loss, elapsed_s, examples_per_s]], "eval": [[step, metric, elapsed_s, loss]]}``."""
    train, evals = [], []
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event.get("event") == "train":
                train.append([event["step"], event["loss"], event["elapsed"], event.get("examples_per_s")])
            elif event.get("event") == "eval" and metric in event:
                evals.append([event["step"], event[metric], event["elapsed"], event.get("loss")])
    return {"train": train, "eval": evals}


def median_throughput(train_curve: list[list[float]]) -> float | None:
    """Examples per second of the optimizer steps alone (evaluation and saving excluded)."""
    speeds = [row[3] for row in train_curve if row[3]]
    return statistics.median(speeds) if speeds else None


def python_command() -> list[str]:
    return [sys.executable, "-m", "peftkit.compare.worker"]


BASELINE_FILE = "baseline.json"


def baseline(config: Any) -> dict[str, Any] | None:
    """The task's floor for a comparison (a classifier's majority-class score), from the data alone, or
    None when the task defines none (``Task.baseline``) or it cannot be computed."""
    from ..run.runner import build_task

    task = build_task(config)
    compute = getattr(task, "baseline", None)
    if compute is None:
        return None
    try:
        return compute(task.load_data())
    except (OSError, ValueError, KeyError) as exc:  # the runs will report the data problem themselves
        return {"error": f"{type(exc).__name__}: {exc}"}

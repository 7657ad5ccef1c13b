"""Measure one (case, library, repetition) in this fresh process: ``python -m benchmarks.worker JOB.json OUT.json``.

One configuration per process keeps the measurements independent: the peak resident memory
(``ru_maxrss``) is this configuration's alone, and nothing one library allocated or imported is still
around when the other runs. The record written to ``OUT.json`` holds every raw sample; the driver
(``run.py``) pairs the records across libraries and summarises them (``summarise.py``).

Timing: ``time.perf_counter`` around each call, with ``torch.cuda.synchronize()`` on both sides on a
GPU (kernels run asynchronously). Memory on CPU: peak RSS from ``getrusage`` and the RSS after the model
and adapter are built, before the first step (their difference is what training itself added). On a
GPU: ``torch.cuda.max_memory_allocated`` and ``memory_allocated`` likewise.
"""

from __future__ import annotations

import copy
import json
import os
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks import cases
from benchmarks.cases import FULL, MIXED_ADAPTERS, Job

MB = 2**20
LEARNING_RATE = 1e-4  # small enough that a few steps stay finite whatever the weights
SAVE_LOAD_REPEATS = 2


def current_rss_mb() -> float:
    """Resident memory of this process now (Linux ``/proc/self/statm``; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / MB


def peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS, where this suite is not run). The kernel updates that
    # high-water mark lazily, so it can read a fraction of a MB below the resident size /proc reports at
    # the same moment; the peak is never below a size actually seen.
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, current_rss_mb())


class Clock:
    """Wall-clock timing that waits for the GPU's queued kernels at both ends."""

    def __init__(self, device: str) -> None:
        import torch

        self.cuda = device.startswith("cuda")
        self.torch = torch

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def time(self, call) -> tuple[float, Any]:
        self.sync()
        start = time.perf_counter()
        out = call()
        self.sync()
        return time.perf_counter() - start, out


def _median(values: list[float]) -> float | None:
    import statistics

    return statistics.median(values) if values else None


def _count(net, lib: str) -> dict[str, int]:
    params = list(net.parameters())
    return {
        "adapted_modules": cases.adapted_modules(net, lib),
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "total_params": sum(p.numel() for p in params),
    }


def _warmup(job: Job) -> int:
    return job.options.get("warmup", job.case.warmup)


def _batches(job: Job, clock: Clock, vocab: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The timed batch, and the warm-up batch: shorter on CPU where the case says so (it initialises
    the optimizer state and every lazily built piece at a fraction of the cost); the timed batch itself
    on a GPU, where cuBLAS and the caching allocator settle per shape."""
    case = job.case
    batch = cases.make_batch(case.model, vocab, job.weights, job.seed, device=job.device)
    if not case.warmup_tokens or clock.cuda:
        return batch, batch
    return batch, cases.make_batch(case.model, vocab, job.weights, job.seed, case.warmup_tokens, job.device)


def run_train(job: Job, clock: Clock) -> dict[str, Any]:
    """Forward + backward + AdamW step, ``warmup`` untimed then ``timed`` timed; memory around them."""
    import torch

    case, start = job.case, time.perf_counter()
    net = cases.adapt(cases.load_model(case.model, job.weights, job.seed, job.device), case, job.lib)
    net.train()
    vocab = net.config.vocab_size
    batch, warm = _batches(job, clock, vocab)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=LEARNING_RATE)
    info = {**_count(net, job.lib), "setup_s": time.perf_counter() - start}

    def step(inputs: dict[str, torch.Tensor]) -> float:
        loss = net(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    loaded = current_rss_mb()
    if clock.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        loaded_gpu = torch.cuda.memory_allocated() / MB
    # The warm-up steps are timed too: the first full-size one (optimizer state, per-shape kernel set-up,
    # allocator growth) is what a one-step benchmark measures, reported beside the steady state.
    warm_times = [clock.time(lambda: step(warm))[0] for _ in range(_warmup(job))]
    times, losses = [], []
    for _ in range(job.options.get("timed", case.timed)):
        seconds, loss = clock.time(lambda: step(batch))
        times.append(seconds)
        losses.append(loss)
    first = warm_times[0] if warm_times and warm is batch else None
    metrics = {
        "step_s": _median(times),
        "first_step_s": first,
        "peak_rss_mb": max(peak_rss_mb(), loaded),  # the high-water mark lags; see peak_rss_mb
        "loaded_rss_mb": loaded,
    }
    if clock.cuda:
        peak = torch.cuda.max_memory_allocated() / MB
        metrics.update(
            peak_mb=peak, loaded_mb=loaded_gpu, overhead_mb=peak - loaded_gpu, memory="cuda_allocated"
        )
    else:
        metrics.update(
            peak_mb=metrics["peak_rss_mb"],
            loaded_mb=loaded,
            overhead_mb=metrics["peak_rss_mb"] - loaded,
            memory="rss",
        )
    return {
        "metrics": metrics,
        "samples": {"step_s": times, "warmup_s": warm_times, "loss": losses},
        "info": info,
    }


def _forward(net, batch: dict[str, Any], model: str, **kwargs: Any):
    import torch

    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], **kwargs}
    if model == "smollm2":
        inputs["use_cache"] = False  # one forward over the whole sequence: a KV cache would only cost time
    with torch.no_grad():
        return net(**inputs).logits


def run_infer(job: Job, clock: Clock) -> dict[str, Any]:
    """Latency of the base model, the unmerged adapter and the merged adapter, in interleaved rounds;
    then adapter save and load time."""
    import torch

    case, start = job.case, time.perf_counter()
    base = cases.load_model(case.model, job.weights, job.seed, job.device).eval()
    # Random A and B (not B = 0), so the merge really changes the weights and the check below means something.
    torch.manual_seed(job.seed + 1)
    unmerged = cases.adapt(copy.deepcopy(base), case, job.lib, init_lora_weights=False).eval()
    torch.manual_seed(job.seed + 1)
    merged = cases.merge(
        cases.adapt(copy.deepcopy(base), case, job.lib, init_lora_weights=False).eval(), job.lib
    )
    info = {**_count(unmerged, job.lib), "setup_s": time.perf_counter() - start}
    batch, warm = _batches(job, clock, base.config.vocab_size)
    variants = {"base": base, "unmerged": unmerged, "merged": merged}
    samples: dict[str, list[float]] = {name: [] for name in variants}
    outputs = {}
    rounds, warmup = job.options.get("timed", case.timed), _warmup(job)
    names = list(variants)
    for index in range(warmup + rounds):
        inputs = warm if index < warmup else batch
        # The same round sees the same machine load for all three; the order rotates from round to
        # round and from repetition to repetition, so no variant always pays for going first (the first
        # full-size call faults in pages).
        shift = (index + job.rep) % 3
        for name in names[shift:] + names[:shift]:
            net = variants[name]
            seconds, out = clock.time(lambda net=net, inputs=inputs: _forward(net, inputs, case.model))
            if index < warmup:
                outputs[name] = out
            else:
                samples[name].append(seconds)
    if not outputs:  # no warm-up round: take the outputs now, untimed
        outputs = {name: _forward(net, batch, case.model) for name, net in variants.items()}
    checks = {
        "merged_vs_unmerged_max_abs": (outputs["merged"] - outputs["unmerged"]).abs().max().item(),
        "unmerged_vs_base_max_abs": (outputs["unmerged"] - outputs["base"]).abs().max().item(),
    }
    samples["save"], samples["load"] = [], []
    with tempfile.TemporaryDirectory(prefix="peftkit-bench-") as tmp:
        for index in range(SAVE_LOAD_REPEATS):
            directory = Path(tmp) / f"adapter{index}"
            seconds, _ = clock.time(lambda directory=directory: cases.save(unmerged, job.lib, directory))
            samples["save"].append(seconds)
            fresh = copy.deepcopy(base)  # untimed: loading needs a pristine base each time
            seconds, _ = clock.time(
                lambda fresh=fresh, directory=directory: cases.load(fresh, job.lib, directory)
            )
            samples["load"].append(seconds)
            del fresh
    metrics = {f"{name}_s": _median(values) for name, values in samples.items()}
    ratios = [u / b for u, b in zip(samples["unmerged"], samples["base"])]
    merged_ratios = [m / b for m, b in zip(samples["merged"], samples["base"])]
    metrics["unmerged_overhead"] = _median(ratios) - 1 if ratios else None
    metrics["merged_overhead"] = _median(merged_ratios) - 1 if merged_ratios else None
    return {"metrics": metrics, "samples": samples, "info": {**info, **checks}}


def run_mixed(job: Job, clock: Clock) -> dict[str, Any]:
    """One batch whose examples name one of 4 adapters each, against the whole batch on one adapter."""
    import torch

    case, start = job.case, time.perf_counter()
    net = cases.load_model(case.model, job.weights, job.seed, job.device).eval()
    names = [f"a{k}" for k in range(MIXED_ADAPTERS)]
    for k, name in enumerate(names):
        torch.manual_seed(job.seed + 1 + k)  # random, different adapters: the routing must matter
        net = cases.adapt(net, case, job.lib, name=name, init_lora_weights=False)
    net.eval()
    cases.set_active(net, job.lib, names[0])
    info = {**_count(net, job.lib), "setup_s": time.perf_counter() - start}
    batch = cases.make_batch(case.model, net.config.vocab_size, job.weights, job.seed, device=job.device)
    rows = batch["input_ids"].shape[0]
    per_example = [names[i % len(names)] for i in range(rows)]
    samples: dict[str, list[float]] = {"single": [], "mixed": []}
    info["mixed_batch"] = f"{rows} examples, adapters {names} in turn"

    def mixed() -> Any:
        # A fresh context each call: peftkit's is a one-shot context manager, and entering it is part
        # of what a mixed batch costs.
        routing, extra = cases.mixed_context(net, job.lib, per_example)
        with routing:
            return _forward(net, batch, case.model, **extra)

    available, single_out, mixed_out = True, None, None
    rounds, warmup = job.options.get("timed", case.timed), _warmup(job)
    for index in range(warmup + rounds):
        # single then mixed, mixed then single, ... (and alternating between repetitions): neither
        # always goes first
        for kind in ("single", "mixed") if (index + job.rep) % 2 == 0 else ("mixed", "single"):
            if kind == "single":
                seconds, single_out = clock.time(lambda: _forward(net, batch, case.model))
            elif not available:
                continue
            else:
                try:
                    seconds, mixed_out = clock.time(mixed)
                except Exception as exc:  # noqa: BLE001 - reported as unavailable; the single numbers are kept
                    info["mixed_unavailable"] = f"{type(exc).__name__}: {exc}"
                    available, mixed_out = False, None
                    continue
            if index >= warmup:
                samples[kind].append(seconds)
    if mixed_out is not None:
        # The rows routed to the active adapter must match the single-adapter batch: the routing is real.
        rows_a0 = [i for i, n in enumerate(per_example) if n == names[0]]
        info["mixed_vs_single_a0_max_abs"] = (mixed_out[rows_a0] - single_out[rows_a0]).abs().max().item()
    metrics = {"single_s": _median(samples["single"]), "mixed_s": _median(samples["mixed"])}
    ratios = [m / s for m, s in zip(samples["mixed"], samples["single"])]
    metrics["mixed_over_single"] = _median(ratios)
    return {"metrics": metrics, "samples": samples, "info": info}


RUNNERS = {"train": run_train, "infer": run_infer, "mixed": run_mixed}


def run_job(job: Job) -> dict[str, Any]:
    """Measure ``job`` in this process; the record the driver pairs and summarises."""
    # No case here has a quantized base, yet the reference library imports bitsandbytes whenever it is
    # installed: seconds of start-up and tens of MB of RSS that would count against it. Hidden from both
    # (importlib.util.find_spec then reports it absent).
    sys.modules.setdefault("bitsandbytes", None)
    import torch

    torch.set_num_threads(job.threads)
    if job.case.kind not in RUNNERS:
        raise ValueError(
            f"case {job.case.name!r} has kind {job.case.kind!r}; expected one of {sorted(RUNNERS)}"
        )
    if job.lib == FULL and job.case.kind != "train":
        raise ValueError(
            f"case {job.case.name!r}: full fine-tuning ({FULL!r}) is measured by train cases only"
        )
    result = RUNNERS[job.case.kind](job, Clock(job.device))
    env = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device_name": torch.cuda.get_device_name() if job.device.startswith("cuda") else None,
    }
    return {
        "case": job.case.name,
        "lib": job.lib,
        "rep": job.rep,
        "ok": True,
        "error": None,
        "env": env,
        **result,
    }


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m benchmarks.worker JOB.json OUT.json", file=sys.stderr)
        return 2
    job = Job.from_dict(json.loads(Path(argv[0]).read_text()))
    try:
        record = run_job(job)
    except Exception as exc:  # noqa: BLE001 - the driver records the failure and carries on with the suite
        record = {
            "case": job.case.name,
            "lib": job.lib,
            "rep": job.rep,
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(),
        }
    Path(argv[1]).write_text(json.dumps(record, indent=1))
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

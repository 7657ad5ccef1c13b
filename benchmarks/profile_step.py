"""Where a case's time goes: ``python -m benchmarks.profile_step CASE LIB [--rows 15] [--weights real]``.

Runs one warm-up and then one profiled training step (or forward, for ``infer`` and ``mixed`` cases:
the unmerged adapter, or the 4-adapter mixed batch) of the case under ``torch.profiler`` and prints the
operators that dominate it, by self CPU time (self CUDA time on a GPU), with the memory they allocated.
The tables in docs/performance.md that explain a missed target come from this script.
"""

from __future__ import annotations

import argparse
import copy
import sys

from benchmarks import cases, worker
from benchmarks.cases import MIXED_ADAPTERS, Job


def build(job: Job):
    """``(callable that runs the profiled work once, description)`` for the job's case and library."""
    import torch

    case = job.case
    net = cases.load_model(case.model, job.weights, job.seed, job.device)
    batch = cases.make_batch(case.model, net.config.vocab_size, job.weights, job.seed, device=job.device)
    if case.kind == "train":
        net = cases.adapt(net, case, job.lib).train()
        optimizer = torch.optim.AdamW(
            [p for p in net.parameters() if p.requires_grad], lr=worker.LEARNING_RATE
        )

        def step() -> None:
            net(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step, "one training step (forward + backward + AdamW)"
    net.eval()
    if case.kind == "infer":
        adapted = cases.adapt(copy.deepcopy(net), case, job.lib, init_lora_weights=False).eval()
        return (lambda: worker._forward(adapted, batch, case.model)), "one forward of the unmerged adapter"
    names = [f"a{k}" for k in range(MIXED_ADAPTERS)]
    for name in names:
        net = cases.adapt(net, case, job.lib, name=name, init_lora_weights=False)
    net.eval()
    rows = [names[i % len(names)] for i in range(batch["input_ids"].shape[0])]

    def mixed() -> None:
        routing, extra = cases.mixed_context(net, job.lib, rows)
        with routing:
            worker._forward(net, batch, case.model, **extra)

    return mixed, "one forward of the 4-adapter mixed batch"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.profile_step", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("case", help="a case name (python -m benchmarks.run --list)")
    parser.add_argument("lib", help="peftkit, peft or torch (full fine-tuning cases)")
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--weights", default="real", choices=cases.WEIGHTS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    known = {c.name: c for c in cases.default_cases()}
    if args.case not in known:
        parser.error(f"unknown case {args.case!r}; the cases are: {', '.join(known)}")
    sys.modules.setdefault("bitsandbytes", None)  # as in the worker
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(args.threads)
    job = Job(known[args.case], args.lib, 0, device=args.device, weights=args.weights, threads=args.threads)
    work, what = build(job)
    clock = worker.Clock(args.device)
    work()  # warm-up: optimizer state, lazily built kernels
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if clock.cuda else [])
    with profile(activities=activities, profile_memory=True, record_shapes=False) as prof:
        work()
        clock.sync()
    key = "self_cuda_time_total" if clock.cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=40)
    text = f"{args.case} / {args.lib}: {what}, {args.threads} threads, {args.device}\n{table}"
    print(text)
    return text


if __name__ == "__main__":
    main()

"""Step time by precision on this CPU: ``python -m benchmarks.precision [--case NAME] [--rounds 6]``.

Builds one model per precision in this process, with the same adapter and batch:

- ``fp32``: float32 weights and activations (``train.precision: fp32``, ``model.dtype: float32``);
- ``autocast``: float32 weights, matrix products in bfloat16 under ``torch.autocast``
  (``train.precision: bf16``);
- ``bf16_base``: the frozen base loaded in bfloat16, the adapter's tensors (and a fresh head) in float32
  (``model.dtype: bfloat16``); only for PEFT cases, since full fine-tuning would update bfloat16 weights.

Each gets one full-size warm-up step, then ``--rounds`` interleaved rounds (benchmarks.interleave).
Prints each precision's median step and its ratio to ``fp32`` (docs/performance.md, "bf16 on CPU");
``--json FILE`` also writes the samples.
"""

from __future__ import annotations

import argparse
import json
import sys

from benchmarks import cases, interleave, worker

PRECISIONS = ("fp32", "autocast", "bf16_base")


def build(case: cases.Case, lib: str, precision: str, weights: str):
    import torch

    net = cases.load_model(case.model, weights)
    if precision == "bf16_base":
        net.to(torch.bfloat16)
    return cases.adapt(net, case, lib).train()


def main(argv: list[str] | None = None) -> str:
    import torch

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.precision", description=__doc__.split("\n\n")[0]
    )
    interleave.add_arguments(parser, case="train-minilm-lora-qv")
    parser.add_argument("--lib", default="peftkit", choices=cases.LIBS, help="the library of a PEFT case")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    case = {c.name: c for c in cases.default_cases()}[args.case]
    lib = cases.FULL if case.method == "full" else args.lib
    precisions = PRECISIONS if lib != cases.FULL else PRECISIONS[:2]
    nets = {p: build(case, lib, p, args.weights) for p in precisions}
    batch = cases.make_batch(case.model, nets["fp32"].config.vocab_size, args.weights, 0)

    steps = {
        p: interleave.training_step(nets[p], batch, worker.LEARNING_RATE, bf16=p == "autocast")
        for p in precisions
    }
    first, samples = interleave.time_interleaved(steps, args.rounds)
    medians = interleave.medians(samples)
    lines = [
        f"{case.name} ({lib}), {args.rounds} rounds, {args.threads} threads (median step after one full-size warm-up):",
        *(
            f"  {p:10s} {medians[p]:.3f} s  ({medians[p] / medians['fp32']:.2f} x fp32; first step {first[p]:.3f} s)"
            for p in precisions
        ),
    ]
    if args.json:
        args.json.write_text(
            json.dumps({"case": case.name, "lib": lib, "first": first, "samples": samples}, indent=1)
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(main(sys.argv[1:]))

"""Step time at each side's defaults: ``python -m benchmarks.defaults [--case NAME] [--rounds 6]``.

``make bench`` compares the libraries at equal settings (the model's own dropout, float32), which
isolates the adapter path. A user gets each side's defaults instead; this times, in one process and
interleaved (benchmarks.interleave), one step of:

- ``peftkit``: the case's adapter with peftkit's run defaults: ``model.base_dropout: auto`` (attention
  dropout off for adapter runs) and ``train.precision: auto`` (bf16 autocast where the CPU or GPU has
  native bf16);
- ``peft``: the same adapter through the reference library, at its defaults (the model's dropout, fp32);
- ``full``: full fine-tuning at peftkit's defaults (the model's dropout, ``precision: auto``);
- ``full_fp32``: full fine-tuning in float32 with the model's dropout (``make bench``'s full FT).

Prints the medians and the ratios the issue-24 targets are stated in (docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import sys

from benchmarks import cases, interleave, worker

SETUPS = ("peftkit", "peft", "full", "full_fp32")


def main(argv: list[str] | None = None) -> str:
    import torch

    from peftkit import set_base_dropout
    from peftkit.core.dropout import head_outside_base
    from peftkit.models.config import ModelConfig, base_dropout_mode
    from peftkit.train.runtime import resolve_precision

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.defaults", description=__doc__.split("\n\n")[0]
    )
    interleave.add_arguments(parser, case="train-minilm-lora-qv")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    case = {c.name: c for c in cases.default_cases()}[args.case]
    if case.method == "full":
        parser.error(f"{case.name} is full fine-tuning; name a LoRA or DoRA case, it is timed beside full FT")
    auto = resolve_precision("auto", torch.device("cpu"))
    precision = {"peftkit": auto, "peft": "fp32", "full": auto, "full_fp32": "fp32"}
    nets = {}
    for setup in SETUPS:
        net = cases.load_model(case.model, args.weights)
        if setup == "peftkit":
            mode = base_dropout_mode(ModelConfig(), full_fine_tuning=False)
            set_base_dropout(net, mode, skip=head_outside_base(net))
        lib = {"peftkit": "peftkit", "peft": "peft"}.get(setup, cases.FULL)
        nets[setup] = cases.adapt(net, case, lib).train()
    batch = cases.make_batch(case.model, nets["peft"].config.vocab_size, args.weights, 0)

    steps = {
        s: interleave.training_step(nets[s], batch, worker.LEARNING_RATE, bf16=precision[s] == "bf16")
        for s in SETUPS
    }
    first, samples = interleave.time_interleaved(steps, args.rounds)
    m = interleave.medians(samples)
    lines = [
        f"{case.name}, {args.rounds} rounds, {args.threads} threads, precision auto = {auto} here "
        "(median step after one full-size warm-up):",
        *(f"  {s:10s} {m[s]:.3f} s  ({precision[s]}; first step {first[s]:.3f} s)" for s in SETUPS),
        f"  peftkit/peft {m['peftkit'] / m['peft']:.3f}   peftkit/full {m['peftkit'] / m['full']:.3f}   "
        f"peftkit/full_fp32 {m['peftkit'] / m['full_fp32']:.3f}   peft/full_fp32 {m['peft'] / m['full_fp32']:.3f}",
    ]
    if args.json:
        args.json.write_text(
            json.dumps(
                {"case": case.name, "precision": precision, "first": first, "samples": samples}, indent=1
            )
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(main(sys.argv[1:]))

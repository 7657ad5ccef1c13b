"""Step time by the frozen base's dropout: ``python -m benchmarks.base_dropout [--case NAME] [--rounds 6]``.

Builds one model per ``model.base_dropout`` mode (keep, attention_off, off) in this process, with the
same adapter (peftkit) and batch, gives each one full-size warm-up step, then times ``--rounds`` rounds
in which every mode takes one step, the order rotating per round, so the machine's drift hits all
alike. Prints each mode's median step and its ratio to ``keep`` (docs/training.md, "Dropout in the
frozen base"); ``--json FILE`` also writes the samples.
"""

from __future__ import annotations

import argparse
import json
import sys

from benchmarks import cases, interleave, worker

MODES = ("keep", "attention_off", "all_off")


def main(argv: list[str] | None = None) -> str:
    import torch

    from peftkit import set_base_dropout
    from peftkit.core.dropout import head_outside_base

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.base_dropout", description=__doc__.split("\n\n")[0]
    )
    interleave.add_arguments(parser, case="train-minilm-lora-qv")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    case = {c.name: c for c in cases.default_cases()}[args.case]
    nets = {}
    for mode in MODES:
        net = cases.load_model(case.model, args.weights)
        set_base_dropout(net, mode, skip=head_outside_base(net))
        nets[mode] = cases.adapt(net, case, "peftkit").train()
    batch = cases.make_batch(case.model, nets["keep"].config.vocab_size, args.weights, 0)

    steps = {mode: interleave.training_step(nets[mode], batch, worker.LEARNING_RATE) for mode in MODES}
    first, samples = interleave.time_interleaved(steps, args.rounds)
    medians = interleave.medians(samples)
    lines = [
        f"{case.name}, {args.rounds} rounds, {args.threads} threads (median step after one full-size warm-up):",
        *(
            f"  {mode:14s} {medians[mode]:.3f} s  ({medians[mode] / medians['keep']:.2f} x keep; first step {first[mode]:.3f} s)"
            for mode in MODES
        ),
    ]
    if args.json:
        args.json.write_text(json.dumps({"case": case.name, "first": first, "samples": samples}, indent=1))
    return "\n".join(lines)


if __name__ == "__main__":
    print(main(sys.argv[1:]))

"""Peak memory of LoRA training on CPU under fp32 and bf16 autocast, with the shapes dynamic padding makes.

    python -m benchmarks.autocast_memory [--steps 20]

Each arm trains MiniLM for ``--steps`` steps of 16 examples whose lengths are drawn from 10-64 tokens
(seeded, the same lengths for every arm), in a process of its own, and reports that process's maximum
resident memory and the training loop's wall time (run it on a quiet machine for the times). Targets:
LoRA on query and value at rank 8; "spread", LoRA on 24 modules (value, attention output, intermediate
and output of every layer) at ranks 1-6, as a budgeted selection chooses. Arms: fp32, bf16 autocast,
autocast with lengths padded to a multiple of 8 and of 16, and autocast with oneDNN's primitive cache
off. docs/performance.md ("bf16 on CPU") explains the result.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import subprocess
import sys
import time

ARMS = {
    "fp32": {"precision": "fp32"},
    "autocast": {"precision": "bf16"},
    "autocast, pad 8": {"precision": "bf16", "pad": 8},
    "autocast, pad 16": {"precision": "bf16", "pad": 16},
    "autocast, no primitive cache": {"precision": "bf16", "env": {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"}},
}
SPREAD = ["attention.self.value", "attention.output.dense", "intermediate.dense", "output.dense"]


def train(targets: str, precision: str, pad: int, steps: int) -> tuple[float, float]:
    """Train; the process's peak resident memory in MB and the training loop's seconds."""
    import torch
    from transformers import AutoModelForSequenceClassification

    import peftkit
    from peftkit.models import bundled_model_path

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(bundled_model_path("minilm"), num_labels=2)
    if targets == "qv":
        config = peftkit.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"])
    else:
        names = [f"bert.encoder.layer.{i}.{suffix}" for i in range(6) for suffix in SPREAD]
        ranks = {name.replace(".", r"\."): 1 + k % 6 for k, name in enumerate(names)}
        config = peftkit.LoraConfig(r=1, lora_alpha=2, target_modules=names, rank_pattern=ranks)
    peftkit.inject(model, config).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    lengths = random.Random(0)
    labels = torch.zeros(16, dtype=torch.long)
    start = time.perf_counter()
    for _ in range(steps):
        length = lengths.randint(10, 64)
        length = -(-length // pad) * pad
        ids = torch.randint(1000, 20000, (16, length))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    seconds = time.perf_counter() - start
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--one", nargs=3, metavar=("TARGETS", "PRECISION", "PAD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        targets, precision, pad = args.one
        peak, seconds = train(targets, precision, int(pad), args.steps)
        print(f"{peak:.0f} {seconds:.2f}")
        return
    print(f"| targets | {' | '.join(ARMS)} |")
    print(f"|---|{'---|' * len(ARMS)}")
    for targets, label in (("qv", "LoRA q,v (r 8)"), ("spread", "24 modules, ranks 1-6")):
        cells = []
        for arm in ARMS.values():
            command = [
                sys.executable,
                "-m",
                "benchmarks.autocast_memory",
                "--steps",
                str(args.steps),
                "--one",
            ]
            command += [targets, arm["precision"], str(arm.get("pad", 1))]
            env = {**os.environ, **arm.get("env", {})}
            result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            peak, seconds = map(float, result.stdout.strip().splitlines()[-1].split())
            cells.append(f"{peak:,.0f} MB, {seconds:.1f} s")
        print(f"| {label} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()

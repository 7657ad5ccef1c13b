"""LoftQ's error reduction on the bundled SmolLM2: ``python -m benchmarks.loftq_error [--r 16] [--iters 1 5]``.

For every q/k/v/o/gate/up/down projection of ``smollm2-135m-instruct`` (float32), the relative error
``||W - B|| / ||W||`` of

- the quantized base alone: ``B = Q(W)`` (NF4, 64-value blocks, no double quantization: the quantizer
  LoftQ itself uses, ``peftkit.core.registry.quantizer(4)``);
- LoftQ: ``B = Q' + s B A`` after ``peftkit.inject`` with ``init_lora_weights="loftq"`` (the base and the
  adapter peftkit actually builds), for each ``loftq_iter`` asked.

Prints the mean per layer type as a Markdown table (docs/lora.md, "LoftQ"); ``--json FILE`` also writes
every layer's numbers.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _load():
    import torch
    from transformers import AutoModelForCausalLM

    from peftkit.models import bundled_model_path

    path = bundled_model_path("smollm2-135m-instruct")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _weights(model) -> dict[str, object]:
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if n.split(".")[-1] in TYPES}


def measure(r: int, iters: list[int], layers: list[int] | None = None) -> dict[str, dict[str, float]]:
    """Per layer name: ``{"alone": err, "iter_K": err ...}``; ``layers``: only these decoder layers."""
    import torch

    import peftkit
    from peftkit.core import registry

    original = _weights(_load())
    if layers is not None:
        original = {n: w for n, w in original.items() if int(n.split(".")[2]) in layers}
    quantize = registry.quantizer(4)
    rows: dict[str, dict[str, float]] = defaultdict(dict)
    for k in iters:
        start = time.perf_counter()
        model = peftkit.inject(
            _load(),
            peftkit.LoraConfig(
                r=r,
                lora_alpha=r,
                target_modules=list(TYPES),
                init_lora_weights="loftq",
                loftq_config={"loftq_bits": 4, "loftq_iter": k},
                layers_to_transform=layers,
            ),
        )
        for name, layer in model.named_modules():
            if name in original and hasattr(layer, "adapters"):
                adapter = layer.adapters["default"]
                with torch.no_grad():
                    approx = (
                        layer.base_layer.weight
                        + adapter.scaling * adapter.lora_B.weight @ adapter.lora_A.weight
                    )
                w = original[name]
                rows[name][f"iter_{k}"] = float((w - approx).norm() / w.norm())
                if k == 1:  # the first iteration's base is Q(W) itself
                    rows[name]["alone"] = float((w - layer.base_layer.weight.detach()).norm() / w.norm())
        for name, w in original.items():
            if "alone" not in rows[name]:
                rows[name]["alone"] = float((w - quantize(w)).norm() / w.norm())
        print(f"loftq_iter={k}: {time.perf_counter() - start:.0f} s for {len(original)} layers", flush=True)
    return dict(rows)


def table(rows: dict[str, dict[str, float]], iters: list[int]) -> str:
    columns = ["alone", *(f"iter_{k}" for k in iters)]
    heads = ["NF4 alone", *(f"LoftQ iter {k}" for k in iters), *(f"reduction iter {k}" for k in iters)]
    lines = ["| layer | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    for kind in TYPES:
        mine = [v for n, v in rows.items() if n.endswith(kind)]
        means = {c: sum(v[c] for v in mine) / len(mine) for c in columns}
        cells = [f"{means[c]:.4f}" for c in columns]
        cells += [f"{1 - means[f'iter_{k}'] / means['alone']:.1%}" for k in iters]
        lines.append(f"| {kind} ({len(mine)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.loftq_error", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--iters", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--layers", type=int, nargs="+", help="only these decoder layers (default: all 30)")
    parser.add_argument("--json", help="also write every layer's errors here")
    args = parser.parse_args(argv)
    rows = measure(args.r, args.iters, args.layers)
    out = table(rows, args.iters)
    print(out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"r": args.r, "iters": args.iters, "decoder_layers": args.layers, "layers": rows}, f, indent=1
            )
    return out


if __name__ == "__main__":
    main()

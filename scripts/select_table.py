"""The selection experiment's table (docs/select.md) from `peftkit compare` records.

    .venv/bin/python scripts/select_table.py runs/experiment-select-minilm accuracy
    .venv/bin/python scripts/select_table.py runs/experiment-select-smollm2 loss chrf --same 611k=576k

Runs are named ``<arm>-<budget>``; for each budget it prints every arm's test metric (mean ± sd over
seeds, and each seed), its trainable parameters besides the always-trained head, and the per-seed
difference to the best default (``qv`` or ``all-linear``, whichever has the better mean) with how many
seeds the arm wins. A last table pools every budget: per arm, the mean per-seed difference to that
budget's best default and the seeds won, i.e. how reliably the arm matches or beats it.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

DEFAULTS = ("qv", "all-linear")


def main(directory: str, metric: str, *extra: str) -> None:
    same = {}
    if "--same" in extra:  # --same A=B: runs named <arm>-A sit in budget B's table (a near-equal budget)
        at = extra.index("--same")
        same = dict(pair.split("=", 1) for pair in extra[at + 1 :])
        extra = extra[:at]
    records = [json.loads(p.read_text()) for p in sorted(Path(directory, "records").glob("*.json"))]
    records = [r for r in records if r.get("status") == "completed"]
    lower_better = metric in ("loss", "perplexity")
    groups: dict[str, dict[str, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    for r in records:
        arm, budget = r["name"].rsplit("-", 1)
        groups[same.get(budget, budget)][arm][r["seed"]] = r
    pooled: dict[str, list[float]] = defaultdict(list)
    scale = 100 if metric in ("accuracy", "macro_f1", "exact_match") else 1
    for budget in sorted(groups, key=lambda b: float(b.rstrip("kKmM")) * (1e6 if b[-1] in "mM" else 1e3)):
        arms = groups[budget]
        means = {a: statistics.mean(s["test"][metric] for s in seeds.values()) for a, seeds in arms.items()}
        defaults = [a for a in arms if a in DEFAULTS]
        best = (min if lower_better else max)(defaults, key=means.get) if defaults else None
        print(f"\nbudget {budget}: best default = {best}")
        cols = " | ".join(extra)
        print(
            f"| arm | trainable (excl. head) | {metric} mean ± sd | per seed | vs {best}, per seed | wins |"
            + (f" {cols} |" if extra else "")
        )
        print("|---|---|---|---|---|---|" + "---|" * len(extra))
        for arm, seeds in arms.items():
            values = [seeds[s]["test"][metric] for s in sorted(seeds)]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            head = _head_params(seeds[min(seeds)], directory)
            trainable = seeds[min(seeds)]["trainable_params"] - head
            diffs = [
                seeds[s]["test"][metric] - arms[best][s]["test"][metric]
                for s in sorted(seeds)
                if best and s in arms[best]
            ]
            wins = sum(d < 0 if lower_better else d > 0 for d in diffs)
            if arm != best:
                pooled[arm] += diffs
            show = [f"{v * scale:.1f}" if scale == 100 else f"{v:.3f}" for v in values]
            delta = ", ".join(f"{d * scale:+.1f}" if scale == 100 else f"{d:+.3f}" for d in diffs)
            extra_cells = []
            for name in extra:
                vals = [seeds[s]["test"].get(name) for s in sorted(seeds)]
                vals = [v for v in vals if v is not None]
                extra_cells.append(
                    f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals) if len(vals) > 1 else 0:.2f}"
                )
            mean = means[arm] * scale
            print(
                f"| {arm} | {trainable:,} | {mean:.{1 if scale == 100 else 3}f} ± {sd * scale:.{1 if scale == 100 else 3}f} "
                f"| {', '.join(show)} | {delta if arm != best else '-'} | {f'{wins}/{len(diffs)}' if arm != best else '-'} |"
                + (" " + " | ".join(extra_cells) + " |" if extra else "")
            )
    print(
        f"\nall budgets pooled: per-seed difference to each budget's best default ({metric}"
        f"{', lower is better' if lower_better else ''})"
    )
    print("| arm | mean difference | seeds won |")
    print("|---|---|---|")
    for arm, diffs in sorted(
        pooled.items(), key=lambda kv: statistics.mean(kv[1]) * (1 if lower_better else -1)
    ):
        won = sum(d < 0 if lower_better else d > 0 for d in diffs)
        digits = 1 if scale == 100 else 3
        print(f"| {arm} | {statistics.mean(diffs) * scale:+.{digits}f} | {won}/{len(diffs)} |")


def _head_params(record: dict, directory: str) -> int:
    """Parameters of the head every run trains in full (a classifier), read from the saved adapter."""
    from safetensors import safe_open

    run = Path(
        directory, "runs", record["name"], f"seed-{record['seed']}", record.get("artifact") or "adapter"
    )
    with safe_open(str(run / "adapter_model.safetensors"), "pt") as handle:
        return sum(_numel(handle.get_slice(k).get_shape()) for k in handle.keys() if ".classifier." in k)


def _numel(shape) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


if __name__ == "__main__":
    main(*sys.argv[1:])

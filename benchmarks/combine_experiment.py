"""Combining two task adapters, and extracting a LoRA from a full fine-tune: ``python -m benchmarks.combine_experiment``.

The experiment behind docs/combine.md, on the bundled MiniLM and data:

1. One base model with a *shared head layout*: a 5-way classifier whose logits 0-1 are Rotten Tomatoes
   sentiment (configs/sentiment-minilm-lora.yaml: rotten, fresh) and 2-4 the speaker's party in the 2016
   debates (configs/text-classification-csv.yaml: the three classes of its CSV). Each task reads only
   its own logits, so each adapter trains only its own rows of the head (weight decay 0 there), and the
   two adapters' head copies never overlap.
2. A LoRA (r=8, alpha=16, query and value, as both recipes) trained per task on that one model, then
   combined with every ``peftkit.combine`` method, weights (1, 1).
3. Each task's test metric (sentiment: accuracy; debates: macro-F1, the recipe's metric, and accuracy)
   for the base, each adapter alone, and each combination.
4. A full fine-tune of sentiment (2-way head), then ``peftkit.extract_lora`` at ranks 4, 8, 16 and 64:
   accuracy of each extracted LoRA against the full fine-tune's.

Every number per seed (``--seeds``, default 0,1,2: head init, adapter init and batch order; the data
split is the recipes' fixed one). Writes a JSON file (``--out``) and prints the tables with mean and
standard deviation over seeds. ``--quick`` is a smoke test (a few steps, a few test examples, one seed):
its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import peftkit
from peftkit.metrics import accuracy, macro_f1
from peftkit.run.config import load_config
from peftkit.run.runner import build_task

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {
    "sentiment": "configs/sentiment-minilm-lora.yaml",
    "debates": "configs/text-classification-csv.yaml",
}
COMBINATIONS = {  # name -> peftkit.combine options; weights (1, 1) for all
    "linear": {"method": "linear"},
    "svd r=8": {"method": "svd", "rank": 8},
    "ties d=0.5": {"method": "ties", "density": 0.5},
    "dare_linear d=0.5": {"method": "dare_linear", "density": 0.5},
    "dare_ties d=0.5": {"method": "dare_ties", "density": 0.5},
    "magnitude_prune d=0.5": {"method": "magnitude_prune", "density": 0.5},
}
EXTRACT_RANKS = (4, 8, 16, 64)


class Task:
    """One task of the shared head: its recipe's data and batches, and its slice of the logits."""

    def __init__(
        self, name: str, first_logit: int, seed: int, num_labels: int | None, limit: int | None
    ) -> None:
        overrides = [f"train.seed={seed}"] + ([f"model.num_labels={num_labels}"] if num_labels else [])
        self.name, self.recipe = name, build_task(load_config(ROOT / RECIPES[name], overrides))
        splits = self.recipe.load_data()
        self.train, self.test = list(splits["train"]), list(splits["test"])[:limit]
        self.classes = len(self.recipe.labels)
        self.rows = slice(first_logit, first_logit + self.classes)

    def logits(self, model: torch.nn.Module, examples: list) -> torch.Tensor:
        return self.recipe.batch_logits(model, self.recipe.collate(examples))[:, self.rows]

    def evaluate(self, model: torch.nn.Module, batch_size: int = 64) -> dict[str, float]:
        model.eval()
        predictions, targets = [], []
        with torch.no_grad():
            for start in range(0, len(self.test), batch_size):
                part = self.test[start : start + batch_size]
                predictions += self.logits(model, part).argmax(-1).tolist()
                targets += [self.recipe.label_id(e["label"]) for e in part]
        return {"accuracy": accuracy(predictions, targets), "macro_f1": macro_f1(predictions, targets)}


def train(model: torch.nn.Module, task: Task, steps: int, lr: float, seed: int, batch_size: int = 32) -> None:
    """AdamW on the trainable parameters, cross entropy over the task's own logits, linear decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)  # decay would move the other task's rows
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / max(steps, 1))
    order, rng = [], random.Random(seed)
    model.train()
    for _ in range(steps):
        if len(order) < batch_size:
            order += rng.sample(range(len(task.train)), len(task.train))
        batch = [task.train[i] for i in order[:batch_size]]
        del order[:batch_size]
        labels = torch.tensor([task.recipe.label_id(e["label"]) for e in batch])
        loss = F.cross_entropy(task.logits(model, batch), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step(), schedule.step(), optimizer.zero_grad()


def combination_rows(seed: int, steps: int, limit: int | None, log) -> dict[str, dict[str, dict[str, float]]]:
    """Row -> task -> metrics: the base, each adapter alone, each combination."""
    tasks = {"sentiment": Task("sentiment", 0, seed, 5, limit)}
    tasks["debates"] = Task("debates", 2, seed, None, limit)
    torch.manual_seed(seed)
    model = tasks["sentiment"].recipe.load_model()  # MiniLM, mean pooling, a fresh 5-way head
    rows = {}
    with peftkit.disable(model):
        rows["base"] = {name: task.evaluate(model) for name, task in tasks.items()}
    lora = peftkit.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"])
    for name, task in tasks.items():
        started = time.time()
        torch.manual_seed(seed)
        peftkit.inject(model, lora, name)  # the new adapter is the only active and trainable one
        train(model, task, steps, lr=2e-3, seed=seed)
        rows[f"{name} adapter"] = {n: t.evaluate(model) for n, t in tasks.items()}
        log(f"  seed {seed}: trained {name} in {time.time() - started:.0f}s: {rows[f'{name} adapter']}")
    for label, options in COMBINATIONS.items():
        peftkit.combine(
            model, list(tasks), [1.0, 1.0], name=label.replace(" ", "_").replace(".", "p"), **options
        )
        rows[label] = {n: t.evaluate(model) for n, t in tasks.items()}
        log(f"  seed {seed}: {label}: {rows[label]}")
    return rows


def extraction_rows(seed: int, steps: int, limit: int | None, log) -> dict[str, dict[str, float]]:
    """Row -> sentiment metrics: the full fine-tune, and the LoRA extracted from it at each rank."""
    task = Task("sentiment", 0, seed, None, limit)
    torch.manual_seed(seed)
    tuned = task.recipe.load_model()
    started = time.time()
    train(tuned, task, steps, lr=5e-5, seed=seed)
    rows = {"full fine-tune": task.evaluate(tuned)}
    log(f"  seed {seed}: full fine-tune in {time.time() - started:.0f}s: {rows['full fine-tune']}")
    base = task.recipe.load_model()
    for rank in EXTRACT_RANKS:
        peftkit.extract_lora(base, tuned, name=f"r{rank}", rank=rank)
        report = peftkit.combine_report(base, f"r{rank}")
        rows[f"extracted r={rank}"] = {
            **task.evaluate(base),
            "lora_parameters": report.parameters,
            "max_relative_error": report.max_relative_error,
            "not_carried": len(report.not_carried),
        }
        log(f"  seed {seed}: r={rank}: {rows[f'extracted r={rank}']}")
    return rows


def _cell(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{mean:.3f}"


def tables(results: dict) -> str:
    """Markdown tables: mean ± standard deviation over the seeds."""
    seeds = list(results["seeds"])
    combined = [results["seeds"][s]["combination"] for s in seeds]
    lines = [
        "| model | sentiment accuracy | debates macro-F1 | debates accuracy |",
        "| --- | --- | --- | --- |",
    ]
    for row in combined[0]:
        cells = [
            _cell([c[row]["sentiment"]["accuracy"] for c in combined]),
            _cell([c[row]["debates"]["macro_f1"] for c in combined]),
            _cell([c[row]["debates"]["accuracy"] for c in combined]),
        ]
        lines.append(f"| {row} | {' | '.join(cells)} |")
    extracted = [results["seeds"][s]["extraction"] for s in seeds]
    lines += [
        "",
        "| model | sentiment accuracy | LoRA parameters | worst relative error |",
        "| --- | --- | --- | --- |",
    ]
    for row in extracted[0]:
        size = extracted[0][row].get("lora_parameters")
        error = [e[row]["max_relative_error"] for e in extracted] if size else None
        cells = [
            _cell([e[row]["accuracy"] for e in extracted]),
            f"{size:,}" if size else "all",
            _cell(error) if error else "0",
        ]
        lines.append(f"| {row} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.combine_experiment", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: 3 steps, 16 test examples, seed 0")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument(
        "--steps", type=int, default=200, help="training steps per adapter and for the full fine-tune"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="the JSON file (default benchmarks/results/combine-<time>.json)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",") if s.strip()]
    steps, limit = (3, 16) if args.quick else (args.steps, None)
    out = (
        args.out
        or ROOT
        / "benchmarks"
        / "results"
        / f"combine-{time.strftime('%Y%m%d-%H%M')}{'-quick' if args.quick else ''}.json"
    )
    results = {"steps": steps, "quick": args.quick, "test_limit": limit, "seeds": {}}
    log = lambda line: print(line, flush=True)  # noqa: E731
    for seed in seeds:
        log(f"seed {seed}")
        results["seeds"][seed] = {
            "combination": combination_rows(seed, steps, limit, log),
            "extraction": extraction_rows(seed, steps, limit, log),
        }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print("\n" + tables(results) + f"\n\nwritten to {out}")
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

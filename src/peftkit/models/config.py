"""The ``model:`` section of a run config: which pretrained model a task loads, and how.

Its rules, each problem headed by its field path: :func:`model_problems` checks the values alone,
:func:`model_source_problems` that the model can be found (without loading it). Which methods train on
a quantized base is the backends' rule (``peftkit.backends.config``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class ModelConfig:
    """Which pretrained model to start from.

    Attributes:
        name_or_path: A bundled model ("minilm", "smollm2-135m-instruct", "efficientnet-lite0"), a local
            directory, or a hub id (the hub only where a network exists).
        dtype: "float32" or "bfloat16": the dtype the base weights are loaded in.
        num_labels: Classification tasks: number of classes (None: taken from the data).
        gguf_file: For a directory holding a GGUF checkpoint, the file to load.
        quantize: None, or "nf4" / "fp4" (bitsandbytes 4-bit) / "int8" (8-bit): load the base
            quantized (QLoRA); the fresh head and ``lm_head`` stay in ``dtype``, which is also the
            4-bit compute dtype.
        double_quant: 4-bit only: also quantize the per-block scales (QLoRA's double quantization).
        pooling: Text classification: what the fresh head reads. "auto" takes the pooling a
            sentence-transformers model declares (its modules.json), else the model's own
            classification head; "mean", "cls", "max" or "last" put the head on that pooling of the
            last hidden states; "pooler" forces the model's own head (BERT's pooler over [CLS], the
            last token for decoders). See docs/task-text-classification.md.
        base_dropout: Dropout in the frozen base model: "keep" (the model's own), "attention_off"
            (no dropout on attention weights), "all_off" (none in the base; a fresh task head keeps its
            own), or "auto": :data:`PEFT_BASE_DROPOUT` for adapter runs, "keep" for full fine-tuning.
            See docs/training.md, "Dropout in the frozen base".
    """

    name_or_path: str = "minilm"
    dtype: str = "float32"
    num_labels: int | None = None
    gguf_file: str | None = None
    quantize: str | None = None
    double_quant: bool = True
    pooling: str = "auto"
    base_dropout: str = "auto"


# the dtypes a task may load a base in (a task may accept fewer: image classification has no float16)
DTYPE_NAMES = ("float32", "bfloat16", "float16")
POOLINGS = ("auto", "mean", "cls", "max", "last", "pooler")
BASE_DROPOUTS = ("auto", "keep", "attention_off", "all_off")
# What "auto" means for adapter runs (docs/training.md, "Dropout in the frozen base"): attention dropout
# off took a MiniLM LoRA step to 0.71x (SDPA keeps its fused path) at demo accuracy within the spread of
# 3 seeds. all_off is faster still (0.59x) but also removes the hidden-state dropout the adapter's
# inputs see; its mean was the lowest of the three, so the default stops at attention.
PEFT_BASE_DROPOUT = "attention_off"


def base_dropout_mode(model: ModelConfig, full_fine_tuning: bool) -> str:
    """The mode ``model.base_dropout`` stands for: "auto" keeps full fine-tuning's dropout (everything
    trains, so it regularises what trains) and applies :data:`PEFT_BASE_DROPOUT` to adapter runs."""
    if model.base_dropout != "auto":
        return model.base_dropout
    return "keep" if full_fine_tuning else PEFT_BASE_DROPOUT


def model_problems(model: ModelConfig) -> list[str]:
    """Every problem of the section's values, each headed by its field path."""
    from ..backends.config import QUANT_TYPES

    checks = [
        ("dtype", model.dtype in DTYPE_NAMES, f"one of {', '.join(DTYPE_NAMES)}"),
        (
            "num_labels",
            model.num_labels is None or model.num_labels >= 2,
            "at least 2 classes, or null to count them from the data",
        ),
        (
            "quantize",
            model.quantize in (None, *QUANT_TYPES),
            f"null, {', '.join(QUANT_TYPES[:-1])} or {QUANT_TYPES[-1]}",
        ),
        ("pooling", model.pooling in POOLINGS, f"one of {', '.join(POOLINGS)}"),
        ("base_dropout", model.base_dropout in BASE_DROPOUTS, f"one of {', '.join(BASE_DROPOUTS)}"),
    ]
    return [
        f"model.{name}: expected {expected}, got {getattr(model, name)!r}"
        for name, ok, expected in checks
        if not ok
    ]


def model_source_problems(model: ModelConfig) -> list[str]:
    """What stops the model from being found: a name that is neither bundled, a local path nor a hub id,
    or a ``gguf_file`` missing from its directory. Nothing is loaded."""
    from . import source_problem

    problem = source_problem(model.name_or_path, model.gguf_file)
    if problem:
        return [f"model.name_or_path: {problem.rstrip('; ')}"]
    local = Path(model.name_or_path).expanduser()
    if model.gguf_file and local.is_dir() and not (local / model.gguf_file).is_file():
        return [f"model.gguf_file: {model.gguf_file!r} is not in {str(local)!r}"]
    return []

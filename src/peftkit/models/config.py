"""The ``model:`` section of a run config: which pretrained model a task loads, and how."""

from __future__ import annotations

from dataclasses import dataclass


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
    """

    name_or_path: str = "minilm"
    dtype: str = "float32"
    num_labels: int | None = None
    gguf_file: str | None = None
    quantize: str | None = None
    double_quant: bool = True
    pooling: str = "auto"

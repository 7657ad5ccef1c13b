"""The typed sections of a run config (``peftkit train CONFIG.yaml``).

Every YAML key maps to a dataclass field here; ``run/config.py`` loads and validates a file against
these classes and reports every problem at once with its field path (``train.lr: ...``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..train.config import TrainConfig


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


@dataclass
class SplitConfig:
    """How a single data file becomes train / validation / test (a seeded, recorded shuffle)."""

    validation: float = 0.1
    test: float = 0.1
    seed: int = 0


@dataclass
class DataConfig:
    """Where the examples come from and which columns mean what.

    Attributes:
        name: A bundled data set ("rotten_tomatoes", "freedict_eng_fra", "fashion_mnist"), or None
            when ``files`` is given.
        files: A CSV / JSONL / Parquet file, or a mapping split -> file ("train", "validation", "test").
        format: The file type ("csv", "tsv", "json"/"jsonl", "parquet"), or for ``task: causal-lm`` a
            chat record layout ("messages", "sharegpt", "alpaca"; the file type then comes from the
            extension). None infers both: the type from the extension, the layout from the columns.
        columns: Task role -> column name in the files, e.g. {"text": "review", "label": "stars"}.
        split: How a file without ready splits is split (fractions of the whole, seeded).
        max_length: Tokens per example (text tasks).
        max_train_examples: Use only the first N training examples (after shuffling), None = all.
        max_eval_examples: Evaluate on the first N validation / test examples, None = all.
        labels: Class names in label-id order (classification); None = sorted distinct values.
        image_size: Image tasks: side of the square the images are resized to (None: the task's default).
        encoding: The text encoding of CSV and JSON Lines files ("utf-8"; spreadsheet exports are often
            "latin-1" or "cp1252").
        hub: A data set on the Hugging Face Hub, "name" or "name/config" (needs a network, or the
            data set in the local ``datasets`` cache); instead of ``name`` and ``files``.
        hub_splits: Which Hub split feeds each of train / validation / test, e.g.
            {"validation": "dev"}; splits the Hub data set lacks are cut from its train split.
        system_prompt: Causal-LM tasks: a system message put first in every conversation that has none.
        chat_template: Causal-LM tasks: a Jinja chat template (inline, or the path of a file holding
            one) used instead of the tokenizer's own.
    """

    name: str | None = None
    files: str | dict[str, str] | None = None
    format: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    split: SplitConfig = field(default_factory=SplitConfig)
    max_length: int = 128
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    labels: list[str] | None = None
    image_size: int | None = None
    encoding: str = "utf-8"
    hub: str | None = None
    hub_splits: dict[str, str] = field(default_factory=dict)
    system_prompt: str | None = None
    chat_template: str | None = None


@dataclass
class EvalConfig:
    """How evaluation and prediction run.

    Attributes:
        batch_size: Examples per forward pass.
        split: The split ``peftkit eval`` reports by default ("test" or "validation").
        max_new_tokens: The older spelling of ``generation.max_new_tokens``, still read (None: unset).
        metrics: Metric names to report (the task's defaults when empty).
        before_training: ``peftkit train`` also evaluates the test split before training (the base
            model: adapters disabled), so ``metrics.json`` holds the metric before and after.
    """

    batch_size: int = 32
    split: str = "test"
    max_new_tokens: int | None = None
    metrics: list[str] = field(default_factory=list)
    before_training: bool = False


@dataclass
class GenerationSettings:
    """How generation tasks decode, in ``predict``, ``chat`` and evaluation (a transformers
    ``GenerationConfig``). Greedy by default, so evaluations are deterministic.

    Attributes:
        max_new_tokens: Tokens generated per answer at most.
        do_sample: Sample instead of choosing the likeliest token; None samples exactly when
            ``temperature`` (above 0), ``top_p`` or ``top_k`` is set.
        temperature: Sampling temperature (0 or None: greedy).
        top_p: Nucleus sampling: keep the likeliest tokens whose probabilities add up to this.
        top_k: Sample among the ``top_k`` likeliest tokens only.
        num_beams: Beam search width (1: no beam search).
        repetition_penalty: Above 1 discourages repeating tokens (1: off).
        seed: Seed of the sampling generator, so a sampled evaluation can be repeated.
    """

    max_new_tokens: int = 32
    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    num_beams: int = 1
    repetition_penalty: float = 1.0
    seed: int = 0


@dataclass
class SelectConfig:
    """Automatic selection of LoRA targets and ranks (used when ``adapter.target_modules: auto``).

    Attributes:
        budget: Trainable parameters to spend: a share of the base model such as "0.5%", or a count
            such as 82944 or "83k". Modules the run trains anyway (a fresh head) are not counted.
        score: "gradient", "adam", "fisher", "activation" (see docs/select.md), or "random" (a control).
        probe_batches: Training batches the probe runs forward and backward (the probe's whole cost).
        probe_batch_size: Examples per probe batch (None: train.batch_size).
        min_rank: Lowest rank a chosen module gets.
        max_rank: Highest rank any module gets.
        whole_params: Also consider training normalisation layers, biases and small heads in full (off by
            default: see docs/select.md for what they cost in the experiment).
        embeddings: Also consider LoRA on embedding tables (off by default, likewise).
        seed: Seed of the probe's batches and of the random control (None: train.seed).
        init: "gradient": each chosen module's LoRA A starts along the probed gradient's best input
            directions, B at zero (scores gradient and adam); "random": LoRA's own init.
        init_from: A file of such directions (the init.safetensors that ``peftkit select`` writes beside
            selected.yaml), applied after the adapter is built; for a run that does not select itself.
    """

    budget: str | int | None = None
    score: str = "gradient"
    probe_batches: int = 8
    probe_batch_size: int | None = None
    min_rank: int = 1
    max_rank: int = 64
    whole_params: bool = False
    embeddings: bool = False
    seed: int | None = None
    init: str = "gradient"
    init_from: str | None = None


@dataclass
class RunConfig:
    """A whole run: ``task``, ``model``, ``data``, ``adapter``, ``train``, ``eval`` and where results go.

    ``adapter`` holds ``method`` (a name for :func:`peftkit.make_config`, default "lora") and that
    method's config fields, e.g. ``{"method": "lora", "r": 8, "target_modules": ["query", "value"]}``;
    ``method: full`` fine-tunes every parameter instead (the baseline PEFT is compared with).
    """

    task: str = "text-classification"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: dict[str, Any] = field(default_factory=lambda: {"method": "lora"})
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    select: SelectConfig = field(default_factory=SelectConfig)
    output_dir: str = "runs/run"

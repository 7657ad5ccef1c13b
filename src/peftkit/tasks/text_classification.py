"""Text classification (binary or multi-class) with an encoder: ``task: text-classification``.

Examples are ``{"text": str, "label": name or int}``. The class list comes from ``data.labels`` or,
when that is unset, from the sorted distinct label values of the data (so "negative" < "positive",
1 < 2 < 5); the model gets a fresh head with that many outputs unless ``model.num_labels`` says more,
and its config carries the names (``id2label``), so a merged export predicts names too.

Batches are padded to their own longest text (dynamic padding), truncated at ``data.max_length``.
The loss is cross entropy; evaluation reports loss, accuracy and macro-F1 (``peftkit.metrics``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..data.config import DataConfig, padded_width, padding_multiple
from ..data.files import load_examples
from ..data.general_text import GENERAL_TEXT_SOURCE, general_texts
from ..errors import ConfigError
from ..models import explain_missing, quiet_transformers
from ..models.config import ModelConfig
from ..models.loading import DTYPES, model_source, prepare_quantized, pretrained_kwargs
from ..train.config import TrainConfig
from .base import Batch, Example, eval_mode, register_task
from .classification import Classifier, head_problems, metric_problems
from .config import EvalConfig
from .pooling import Pooling, choose_pooling
from .probes import BehaviourProbe, mean_pooled

ROLES = ["text", "label"]


@register_task("text-classification")
class TextClassificationTask(Classifier):
    """Sequence classification of texts; see the module docstring for labels, batches and metrics.

    Built from the run-config sections it reads (each defaults to that section's defaults): ``model``,
    ``data``, ``eval`` (``metrics``) and ``train`` (``seed``, which seeds the fresh head).

    Attributes:
        model_config, data, eval: Those sections.
        seed: Seeds the fresh head.
        labels: Class names in label-id order (None until given by ``data.labels``, the data or the model).
        tokenizer: The model's tokenizer (loaded with the model, or on first use).
        data_info: How the data was loaded and split (``peftkit.data.files.Splits.info``), once loaded.
    """

    name: str
    input_role = ROLES[0]  # the key `peftkit predict` reads from a JSON input
    default_metric = "accuracy"
    greater_is_better = True

    sections = ("model", "data", "eval", "train")

    def __init__(
        self,
        *,
        model: ModelConfig | None = None,
        data: DataConfig | None = None,
        eval: EvalConfig | None = None,
        train: TrainConfig | None = None,
    ) -> None:
        self.model_config = model or ModelConfig()
        self.data = data or DataConfig()
        self.eval = eval or EvalConfig()
        self.seed = (train or TrainConfig()).seed
        self.labels: list[str] | None = [str(n) for n in self.data.labels] if self.data.labels else None
        self.tokenizer: Any = None
        self.data_info: dict[str, Any] | None = None
        self._ids: dict[Any, int] = {}
        self._splits: dict[str, list[dict[str, Any]]] | None = None
        self.pooling: Pooling | None = None  # chosen when the model loads
        problems = _config_problems(self.model_config, self.data, self.eval)
        if problems:
            raise ConfigError(problems, what="text-classification config")
        if self.labels is not None:
            self._ids = {name: i for i, name in enumerate(self.labels)}

    # -- loading -------------------------------------------------------------------------------

    def model_source(self) -> str:
        """A local directory (a bundled model's, or the given one) or a hub id."""
        return model_source(self.model_config)

    def load_data(self) -> dict[str, Sequence[Example]]:
        """The configured splits (loaded once); fixes the label list from the data when unset.

        Raises:
            ConfigError: bad data config, or label values that do not fit ``data.labels``.
        """
        if self._splits is None:
            splits = load_examples(self.data, ROLES)
            values = [ex["label"] for part in splits.values() for ex in part]
            # a Hub data set names its classes (a ClassLabel column): 0/1 then read as negative/positive
            declared = splits.info.get("class_names", {}).get(self.data.columns.get("label", "label"))
            if declared:
                _check_class_label(declared, self.labels, splits)
            self.labels, self._ids = label_mapping(values, self.labels or declared)
            self.data_info = dict(splits.info, labels=list(self.labels))
            self._splits = dict(splits)
        return self._splits

    def load_model(self) -> nn.Module:
        """The pretrained encoder with a freshly initialised head (seeded by ``train.seed``).

        The number of classes is ``model.num_labels``, else the length of the label list (from
        ``data.labels`` or the data, loaded here if needed); with no data configured at all the
        model's own head and label names are kept (e.g. a merged, fine-tuned model for prediction).

        Raises:
            ConfigError: ``model.num_labels`` is smaller than the number of labels.
            OSError: the model cannot be found (the message says where it was looked for).
        """
        from transformers import AutoConfig, AutoModelForSequenceClassification

        model_cfg, data_cfg = self.model_config, self.data
        if self.labels is None and (data_cfg.name or data_cfg.files or data_cfg.hub):
            self.load_data()
        head: dict[str, Any] = {}
        if self.labels is not None:
            num_labels = model_cfg.num_labels or len(self.labels)
            if num_labels < len(self.labels):
                raise ConfigError(
                    [
                        f"model.num_labels is {num_labels} but the data has {len(self.labels)} labels "
                        f"({', '.join(self.labels)}); raise it or leave it unset"
                    ],
                    what="text-classification config",
                )
            names = self.labels + [f"LABEL_{i}" for i in range(len(self.labels), num_labels)]
            head.update(
                num_labels=num_labels,
                id2label=dict(enumerate(names)),
                label2id={n: i for i, n in enumerate(names)},
            )
        elif model_cfg.num_labels:
            head["num_labels"] = model_cfg.num_labels
        # The fresh head must stay unquantized (transformers would quantize it, then fail on it).
        kwargs = pretrained_kwargs(model_cfg, keep_dense=["classifier", "score"])
        source = self.model_source()
        # Seeding here makes the new head's initial weights, and so the whole run, reproducible.
        torch.manual_seed(self.seed)
        with quiet_transformers(), explain_missing(model_cfg.name_or_path):
            source_config = AutoConfig.from_pretrained(source, **_gguf(kwargs))
            self.pooling = self._choose_pooling(source, source_config)
            if self.pooling.native:
                model = AutoModelForSequenceClassification.from_pretrained(source, **kwargs, **head)
            else:
                model = _pooled_model(source, self.pooling.mode, source_config, kwargs, head)
            self._load_tokenizer(source)
        prepare_quantized(model, model_cfg)
        if self.labels is None:
            self.labels = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
            self._ids = {name: i for i, name in enumerate(self.labels)}
        if model.config.pad_token_id is None:
            # Decoder classifiers (Llama, GPT-2) pool the last non-pad token and must know the pad id.
            model.config.pad_token_id = self.tokenizer.pad_token_id
        return model

    def _choose_pooling(self, source: str, config: Any) -> Pooling:
        """The head's pooling (``model.pooling``), from the model's own files and ``config``."""
        from .pooled_classifier import POOLING_KEY

        exported = getattr(config, POOLING_KEY, None)
        if exported and self.model_config.pooling in ("auto", exported):
            return Pooling(
                exported, False, f"a peftkit export whose config.json sets {POOLING_KEY}: {exported}"
            )
        return choose_pooling(self.model_config.pooling, source, config)

    @property
    def head_info(self) -> dict[str, Any] | None:
        """What the classification head reads and why (recorded in ``metrics.json``), once loaded."""
        return self.pooling.as_dict() if self.pooling is not None else None

    def _load_tokenizer(self, source: str) -> Any:
        from transformers import AutoTokenizer

        if self.tokenizer is None:
            with quiet_transformers(), explain_missing(self.model_config.name_or_path):
                tokenizer = AutoTokenizer.from_pretrained(source)
            if tokenizer.pad_token is None:  # decoder tokenizers often have none; batches need one
                tokenizer.pad_token = tokenizer.eos_token
            self.tokenizer = tokenizer
        return self.tokenizer

    # -- batches and loss ------------------------------------------------------------------------

    def label_id(self, value: Any) -> int:
        """The class id of a label value (a name, or a value seen in the data).

        Raises:
            KeyError: the value is not a known label (the message lists the labels).
        """
        if not self._ids:
            raise KeyError(
                "labels are not known yet: call load_data() or load_model() first, or set data.labels"
            )
        for key in (value, str(value)):
            if key in self._ids:
                return self._ids[key]
        raise KeyError(f"label {value!r} is not one of the labels {self.labels}; add it to data.labels")

    def collate(self, examples: Sequence[Example]) -> Batch:
        """Token ids and attention mask padded to the batch's longest text (rounded up to
        ``data.pad_to_multiple_of``); ``labels`` when every example has a label."""
        tokenizer = self._load_tokenizer(self.model_source())
        texts = [_text_of(e) for e in examples]
        batch = dict(
            tokenizer(
                texts,
                padding=True,
                truncation=True,
                max_length=self.data.max_length,
                return_tensors="pt",
            )
        )
        longest = batch["input_ids"].shape[1]
        extra = padded_width(longest, padding_multiple(self.data), self.data.max_length) - longest
        if extra:  # the tokenizer's own pad_to_multiple_of would pad past max_length
            for key, value in batch.items():
                fill = tokenizer.pad_token_id if key == "input_ids" else 0
                side = value.new_full((value.shape[0], extra), fill)
                right = tokenizer.padding_side == "right"
                batch[key] = torch.cat([value, side] if right else [side, value], dim=1)
        if examples and all(isinstance(e, Mapping) and "label" in e for e in examples):
            batch["labels"] = torch.tensor([self.label_id(e["label"]) for e in examples])
        return batch

    def batch_logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return _logits(model, batch).float()

    def inputs(self, items: Sequence[Any]) -> Batch:
        return self.collate([{"text": _text_of(item)} for item in items])

    def order(self, items: Sequence[Any]) -> list[int]:
        # Batching texts of similar length keeps padding, and so evaluation time, small.
        return sorted(range(len(items)), key=lambda i: len(_text_of(items[i])))

    def class_names(self, model: nn.Module) -> list[str]:
        """The task's labels, else the model's own (a merged, fine-tuned model loaded for prediction)."""
        return self.labels or [str(model.config.id2label[i]) for i in range(model.config.num_labels)]

    # -- evaluation and prediction (loss, evaluate, baseline, predict: Classifier) ------------------

    def behaviour_probe(self, model: nn.Module, n: int, batch_size: int) -> BehaviourProbe:
        """Mean-pooled last hidden states (the sentence embedding of sentence-transformers models) of
        ``n`` held-out general texts (``peftkit.data.general_text``): what ``peftkit compare``
        measures forgetting with."""
        texts = general_texts(n)
        features = []
        with eval_mode(model):
            device = next(model.parameters()).device
            for start in range(0, len(texts), batch_size):
                batch = self.collate([{"text": t} for t in texts[start : start + batch_size]])
                out = model(**{k: v.to(device) for k, v in batch.items()}, output_hidden_states=True)
                features.append(mean_pooled(out.hidden_states[-1], batch["attention_mask"]))
        return BehaviourProbe("features", GENERAL_TEXT_SOURCE, features=torch.cat(features))


def _check_class_label(
    declared: Sequence[str], given: Sequence[str] | None, splits: Mapping[str, Sequence[Example]]
) -> None:
    """Refuse what would silently mislabel a Hub data set with a ``ClassLabel`` column: a split without
    labels (-1, as GLUE's test splits are) and ``data.labels`` naming the same classes in another order.

    Raises:
        ConfigError: either case, with the fix.
    """
    problems = []
    unlabelled = [name for name, part in splits.items() if part and all(ex["label"] == -1 for ex in part)]
    if unlabelled:
        problems.append(
            f"the {', '.join(unlabelled)} split(s) of the Hub data set carry no labels (-1, its ClassLabel's "
            "'no label'); feed them from a labelled split with data.hub_splits, e.g. {test: validation}"
        )
    if (
        given is not None
        and sorted(map(str, given)) == sorted(declared)
        and list(map(str, given)) != list(declared)
    ):
        problems.append(
            f"data.labels: {list(given)} names the data set's classes in another order than its ClassLabel "
            f"({list(declared)}, in id order), which would swap them; remove data.labels or write them in that order"
        )
    if problems:
        raise ConfigError(problems, what="text-classification data")


def label_mapping(values: Sequence[Any], names: Sequence[str] | None) -> tuple[list[str], dict[Any, int]]:
    """The class names and a value -> id map for the label ``values`` found in the data.

    With ``names`` (``data.labels``) a value is matched by name (``str(value)``); integers that are
    not names are read as ids into ``names`` (0/1 data with ``labels: [negative, positive]``).
    Without ``names`` the classes are the sorted distinct values.

    Raises:
        ConfigError: fewer than two classes, or values that are neither a name nor a valid id.
    """
    distinct = sorted(set(values), key=lambda v: (isinstance(v, str), v))
    if names is None:
        if len(distinct) < 2:
            raise ConfigError(
                [
                    f"the data has {len(distinct)} distinct label value(s) {distinct}; classification needs at "
                    "least 2: check data.columns.label points at the label column"
                ],
                what="text-classification data",
            )
        names = [str(v) for v in distinct]
        return names, {**{v: i for i, v in enumerate(distinct)}, **{n: i for i, n in enumerate(names)}}
    names = list(names)
    ids: dict[Any, int] = {n: i for i, n in enumerate(names)}
    unknown = []
    for v in distinct:
        if str(v) in ids:
            ids[v] = ids[str(v)]
        elif isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(names):
            ids[v] = v
        else:
            unknown.append(v)
    if unknown:
        raise ConfigError(
            [
                f"label values {unknown} are neither names in data.labels {names} nor ids below {len(names)}; "
                "add them to data.labels (or leave data.labels unset to use the values found)"
            ],
            what="text-classification data",
        )
    return names, ids


def _pooled_model(
    source: str, mode: str, config: Any, kwargs: dict[str, Any], head: dict[str, Any]
) -> nn.Module:
    """The encoder at ``source`` (its ``config`` loaded) under a head reading ``mode`` pooling of its last
    hidden states: a fresh head, or the trained one of a directory peftkit exported."""
    from transformers import AutoModel

    from .pooled_classifier import POOLING_KEY, PooledModelForSequenceClassification

    exported = bool(getattr(config, POOLING_KEY, None))
    for key, value in head.items():
        setattr(config, key, value)
    if exported:  # ``peftkit merge`` wrote it: encoder and trained head load together
        return PooledModelForSequenceClassification.from_pretrained(source, config=config, **kwargs)
    encoder = AutoModel.from_pretrained(source, config=config, **kwargs)
    setattr(config, POOLING_KEY, mode)
    model = PooledModelForSequenceClassification(config, encoder)
    model.classifier.to(kwargs["dtype"])  # not model.to(): a quantized encoder must stay as it is
    # what transformers marks on a model it loaded quantized, which the reference library reads from the
    # top-level model to pick its quantized LoRA layers
    for mark in (
        "is_quantized",
        "quantization_method",
        "hf_quantizer",
        "is_loaded_in_4bit",
        "is_loaded_in_8bit",
    ):
        if mark in vars(encoder):
            setattr(model, mark, vars(encoder)[mark])
    return model.eval()  # as from_pretrained returns a model: the training loop switches modes itself


def _gguf(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k == "gguf_file"}


def _config_problems(model: ModelConfig, data: DataConfig, eval: EvalConfig) -> list[str]:
    """Every problem in the sections this task reads, so they can be reported together."""
    problems = head_problems(model, data, list(DTYPES))
    if data.max_length <= 0:
        problems.append(f"data.max_length: expected a positive number of tokens, got {data.max_length}")
    return problems + metric_problems(eval, "text classification")


def _text_of(item: Any) -> str:
    text = item["text"] if isinstance(item, Mapping) else item
    return text if isinstance(text, str) else str(text)


def _logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    return model(**inputs).logits

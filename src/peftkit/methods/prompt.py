"""Soft prompts: prompt tuning, P-tuning and prefix tuning. They train no weight of the model.

- **Prompt tuning** (Lester et al. 2021, arXiv:2104.08691): ``num_virtual_tokens`` trainable embeddings
  in front of the input's word embeddings.
- **P-tuning** (Liu et al. 2021, arXiv:2103.10385): the same virtual tokens, produced by a prompt encoder
  (an MLP, or a bidirectional LSTM and an MLP, so that the tokens depend on each other).
- **Prefix tuning** (Li & Liang 2021, arXiv:2101.00190): trainable keys and values in front of every
  attention layer. With ``prefix_projection`` they come from a small embedding through a tanh MLP, the
  paper's reparameterisation, which it found to stabilise training.

None of them wraps a layer. A :class:`PromptPart` (``model.peftkit_parts[name]``) installs two forward
hooks on the user's own model: before the call it prepends the virtual tokens (or fills the key/value
cache with the prefix) and extends the attention mask, position ids, token type ids and token labels;
after it, it drops the virtual positions from token-level outputs, which so stay aligned with the input.
A call bringing a non-empty cache (generation after its first step) already has the virtual tokens in
it: only the mask and positions are extended.

Saved as the reference library saves them: one tensor ``prompt_embeddings``, what the model sees (the
virtual-token embeddings, the prompt encoder's output, or the flattened per-layer keys and values).
"""

from __future__ import annotations

import inspect
import math
import os
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..core.layer import ModelPart
from ..core.registry import register_method
from ..errors import ConfigError, UnsupportedLayerError

KEY = "prompt_embeddings"  # the one tensor the interchange format holds for all three methods
_INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")
_ENCODERS = ("MLP", "LSTM")
# AdapterConfig fields that choose layers; these methods choose none, and the reference format lacks them.
_LAYER_FIELDS = (
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
)
_CACHE_ARGS = ("cache", "past_key_values")  # transformers >= 5.x renamed past_key_values to cache


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass
class PromptLearningConfig(AdapterConfig):
    """Fields shared by the three soft-prompt methods (not a method itself).

    Attributes:
        num_virtual_tokens: How many virtual tokens (prompt length, or prefix length). Required.
        token_dim: Width of a virtual token: the model's embedding width for prompt tuning and
            P-tuning; for prefix tuning the width of one layer's keys (``num_key_value_heads * head_dim``).
            None: read from the model.
        num_transformer_submodules: 1 for encoder-only and decoder-only models (the only kind supported).
        num_attention_heads: Heads of the prefix keys/values (key/value heads for grouped-query attention).
        num_layers: Number of attention layers receiving a prefix.
    """

    lr_candidates: ClassVar[tuple[float, ...]] = (
        1e-2,
        3e-2,
        1e-1,
    )  # soft prompts train at 1e-2 to 3e-1 (Lester et al. used 0.3 with Adafactor)

    fields_not_in_format: ClassVar[tuple[str, ...]] = _LAYER_FIELDS

    wraps_layers: ClassVar[bool] = False
    quantizable: ClassVar[bool] = True  # the virtual tokens change inputs, never a quantized weight
    state_key_prefix: ClassVar[str] = "base_model."
    uses_cache: ClassVar[bool] = False  # prefix tuning: the virtual tokens live in the key/value cache

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None

    def problems(self) -> list[str]:
        out = super().problems()
        for name in _LAYER_FIELDS:
            if getattr(self, name) not in (None, {}, []):
                out.append(f"{name}: {self.peft_type} adapts no module; leave it out")
        if not _positive_int(self.num_virtual_tokens):
            out.append(
                f"num_virtual_tokens: required, a positive integer (e.g. 20); got {self.num_virtual_tokens!r}"
            )
        for name in ("token_dim", "num_attention_heads", "num_layers", "encoder_hidden_size"):
            value = getattr(self, name, None)
            if value is not None and not _positive_int(value):
                out.append(f"{name}: a positive integer or None (read from the model); got {value!r}")
        if self.num_transformer_submodules not in (None, 1):
            out.append(
                "num_transformer_submodules: only 1 is supported (encoder-only or decoder-only "
                f"models); got {self.num_transformer_submodules!r}"
            )
        return out

    def after_resolve(self, plan: Any) -> PromptLearningConfig:
        # A private copy: build_part completes it with the model's dimensions, and inject records it.
        return self.replace()

    def build_part(self, model: nn.Module, plan: Any) -> PromptPart:
        """Record the model's dimensions and task in this config (as the reference does); build the part."""
        geometry = _geometry(model, self)
        for name in ("token_dim", "num_attention_heads", "num_layers"):
            setattr(self, name, geometry[name])
        self.num_transformer_submodules = 1
        if getattr(self, "encoder_hidden_size", 0) is None:
            self.encoder_hidden_size = geometry["token_dim"]  # the reference's default
        if self.task_type is None:
            self.task_type = _task_type(model)
        return self.make_part(model)

    def make_part(self, model: nn.Module) -> PromptPart:
        """The method's :class:`PromptPart`, from this (completed) config."""
        raise NotImplementedError


@register_method("PROMPT_TUNING")
@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning: ``num_virtual_tokens`` trainable embeddings before the input (Lester et al. 2021).

    Attributes:
        prompt_tuning_init: ``"RANDOM"`` (N(0, 1), as the reference), ``"TEXT"`` (the word embeddings
            of ``prompt_tuning_init_text``, repeated or cut to length; the paper's ablation found inits
            from real words better than random ones) or ``"SAMPLE_VOCAB"`` (embeddings of random
            vocabulary tokens). Skipped under ``inference_mode`` (a loaded adapter overwrites it).
        prompt_tuning_init_text: The text for ``"TEXT"``.
        tokenizer_name_or_path: The tokenizer for ``"TEXT"`` (loaded with ``AutoTokenizer``).
        tokenizer_kwargs: Extra ``AutoTokenizer.from_pretrained`` arguments for ``"TEXT"``
            (``trust_remote_code`` is dropped, as the reference does).
    """

    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None

    def __post_init__(self) -> None:
        if isinstance(self.tokenizer_name_or_path, os.PathLike):  # saved as JSON: keep a plain string
            self.tokenizer_name_or_path = os.fspath(self.tokenizer_name_or_path)
        super().__post_init__()

    def problems(self) -> list[str]:
        out = super().problems()
        if self.prompt_tuning_init not in _INITS:
            out.append(f"prompt_tuning_init: one of {', '.join(_INITS)}; got {self.prompt_tuning_init!r}")
        if self.prompt_tuning_init == "TEXT":
            if not self.prompt_tuning_init_text:
                out.append("prompt_tuning_init_text: required (non-empty) with prompt_tuning_init='TEXT'")
            if not self.tokenizer_name_or_path:
                out.append("tokenizer_name_or_path: required with prompt_tuning_init='TEXT'")
        elif self.tokenizer_kwargs:
            out.append("tokenizer_kwargs: only used with prompt_tuning_init='TEXT'; remove it")
        return out

    def make_part(self, model: nn.Module) -> PromptPart:
        total = self.num_virtual_tokens
        embedding = nn.Embedding(total, self.token_dim)
        if not self.inference_mode and self.prompt_tuning_init != "RANDOM":
            words = model.get_input_embeddings().weight
            ids = (
                _text_ids(self, words.shape[0])
                if self.prompt_tuning_init == "TEXT"
                else (torch.randint(0, words.shape[0], (total,)).tolist())
            )
            with torch.no_grad():
                embedding.weight.copy_(words.detach()[torch.tensor(ids, device=words.device)].float())
        return SoftPromptPart(embedding, None, total)


def _text_ids(config: PromptTuningConfig, vocab_size: int) -> list[int]:
    """The init text's token ids, repeated or cut to ``num_virtual_tokens`` (as the reference does)."""
    from transformers import AutoTokenizer

    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)  # a saved config must not make loading run remote code
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            [
                f"tokenizer_name_or_path: cannot load a tokenizer from {config.tokenizer_name_or_path!r} "
                f"({exc})"
            ],
            what="PromptTuningConfig with prompt_tuning_init='TEXT'",
        ) from exc
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids or max(ids) >= vocab_size:
        raise ConfigError(
            [
                f"prompt_tuning_init_text: tokenised to {ids[:8]!r}, which the model's {vocab_size}-word "
                "embedding cannot look up; is tokenizer_name_or_path the model's own tokenizer?"
            ],
            what="PromptTuningConfig",
        )
    need = config.num_virtual_tokens
    return (ids * math.ceil(need / len(ids)))[:need]


@register_method("P_TUNING")
@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning: virtual tokens produced by a trainable prompt encoder (Liu et al. 2021).

    Attributes:
        encoder_reparameterization_type: ``"MLP"`` (three linear layers with ReLU) or ``"LSTM"`` (a
            bidirectional LSTM, then a two-layer MLP).
        encoder_hidden_size: Hidden width of the encoder; None: ``token_dim``.
        encoder_num_layers: LSTM layers (the MLP always has two hidden layers, as in the reference).
        encoder_dropout: Dropout between LSTM layers.
    """

    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def problems(self) -> list[str]:
        out = super().problems()
        if self.encoder_reparameterization_type not in _ENCODERS:
            out.append(
                f"encoder_reparameterization_type: one of {', '.join(_ENCODERS)}; got "
                f"{self.encoder_reparameterization_type!r}"
            )
        if not _positive_int(self.encoder_num_layers):
            out.append(f"encoder_num_layers: a positive integer; got {self.encoder_num_layers!r}")
        if not isinstance(self.encoder_dropout, (int, float)) or not 0 <= self.encoder_dropout < 1:
            out.append(f"encoder_dropout: must be in [0, 1); got {self.encoder_dropout!r}")
        return out

    def make_part(self, model: nn.Module) -> PromptPart:
        total, dim, hidden = self.num_virtual_tokens, self.token_dim, self.encoder_hidden_size
        encoder = None
        if not self.inference_mode:  # a loaded (inference) adapter is the encoder's saved output alone
            if self.encoder_reparameterization_type == "LSTM":
                encoder = _LstmEncoder(dim, hidden, self.encoder_num_layers, float(self.encoder_dropout))
            else:
                if self.encoder_num_layers != 2:
                    warnings.warn(
                        f"P-tuning's MLP encoder always has 2 hidden layers; encoder_num_layers="
                        f"{self.encoder_num_layers} only applies to the LSTM encoder",
                        stacklevel=3,
                    )
                encoder = nn.Sequential(
                    nn.Linear(dim, hidden),
                    nn.ReLU(),
                    nn.Linear(hidden, hidden),
                    nn.ReLU(),
                    nn.Linear(hidden, dim),
                )
        return SoftPromptPart(nn.Embedding(total, dim), encoder, total)


class _LstmEncoder(nn.Module):
    """P-tuning's LSTM head: a bidirectional LSTM over the virtual tokens, then a two-layer MLP."""

    def __init__(self, dim: int, hidden: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.lstm_head = nn.LSTM(
            dim, hidden, num_layers=layers, dropout=dropout, bidirectional=True, batch_first=True
        )
        width = 2 * hidden  # both directions
        self.mlp_head = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_head(self.lstm_head(x)[0])


@register_method("PREFIX_TUNING")
@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning: trainable keys and values in front of every attention layer (Li & Liang 2021).

    Attributes:
        prefix_projection: Produce the prefix from a ``(num_virtual_tokens, token_dim)`` embedding through
            ``Linear(token_dim, encoder_hidden_size) -> tanh -> Linear(.., num_layers * 2 * token_dim)``
            while training (the paper's reparameterisation); only its output is saved.
        encoder_hidden_size: Hidden width of that MLP; None: ``token_dim``.
        init_weights: None (random) or ``"zero"`` (all prefix keys and values start at zero).
    """

    uses_cache: ClassVar[bool] = True

    init_weights: str | None = None
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False

    def problems(self) -> list[str]:
        out = super().problems()
        if self.init_weights not in (None, "zero"):
            out.append(f"init_weights: None or 'zero'; got {self.init_weights!r}")
        if not isinstance(self.prefix_projection, bool):
            out.append(f"prefix_projection: True or False; got {self.prefix_projection!r}")
        return out

    def make_part(self, model: nn.Module) -> PromptPart:
        total, dim = self.num_virtual_tokens, self.token_dim
        width = self.num_layers * 2 * dim  # per virtual token: a key and a value for every layer
        encoder = None
        if self.prefix_projection and not self.inference_mode:
            embedding = nn.Embedding(total, dim)
            encoder = nn.Sequential(
                nn.Linear(dim, self.encoder_hidden_size),
                nn.Tanh(),
                nn.Linear(self.encoder_hidden_size, width),
            )
            last = encoder[-1]
        else:
            embedding = last = nn.Embedding(total, width)
        if self.init_weights == "zero":
            for tensor in last.parameters():
                nn.init.zeros_(tensor)
        heads = self.num_attention_heads
        shape = (self.num_layers, heads, dim // heads)
        return PrefixPart(embedding, encoder, total, shape, _cache_arg(model))


# -- what the model offers ---------------------------------------------------------------------------


def _model_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedLayerError(
            f"soft prompts need a transformers model (with a .config); got {type(model).__name__}. Pass the "
            "transformers model itself (e.g. AutoModelForCausalLM), not a wrapper; for other models use a "
            "layer method such as LoRA or IA3"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedLayerError(
            f"{type(model).__name__} is an encoder-decoder model; peftkit's soft "
            "prompts support encoder-only and decoder-only models"
        )
    text = getattr(config, "get_text_config", None)
    return text() if callable(text) else config


def _first(config: Any, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def _geometry(model: nn.Module, config: PromptLearningConfig) -> dict[str, int]:
    """token_dim, num_attention_heads and num_layers for this model. Explicit config values that the
    model cannot take are refused here; they would otherwise fail deep inside attention."""
    mc = _model_config(model)
    layers = _first(mc, ("num_hidden_layers", "num_layers", "n_layer"))
    hidden = _first(mc, ("hidden_size", "n_embd", "d_model"))
    heads = _first(mc, ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"))
    if None in (layers, hidden, heads):
        raise UnsupportedLayerError(
            f"cannot read the layer count, width and heads of {type(model).__name__} "
            "from its config; set num_layers, token_dim and num_attention_heads"
        )
    if config.uses_cache:
        # A layer's keys are (batch, kv_heads, length, head_dim); grouped-query attention has fewer key/value
        # heads than query heads, so the prefix is as wide as the keys, not as the hidden state.
        kv_heads = getattr(mc, "num_key_value_heads", None) or heads
        head_dim = getattr(mc, "head_dim", None) or hidden // heads
        want = {"token_dim": kv_heads * head_dim, "num_attention_heads": kv_heads, "num_layers": layers}
        checked = list(want)
    else:  # only the width matters; heads and layers are recorded for the reference's benefit
        want = {
            "token_dim": _input_embeddings(model).weight.shape[1],
            "num_attention_heads": heads,
            "num_layers": layers,
        }
        checked = ["token_dim"]
    wrong = [
        f"{k}={getattr(config, k)} but {type(model).__name__} needs {want[k]}"
        for k in checked
        if getattr(config, k) not in (None, want[k])
    ]
    if wrong:
        raise ConfigError(
            wrong + ["leave these fields None to read them from the model"],
            what=f"{type(config).__name__} for this model",
        )
    return {k: getattr(config, k) or v for k, v in want.items()}


def _input_embeddings(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    weight = getattr(embeddings, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise UnsupportedLayerError(
            f"{type(model).__name__} has no get_input_embeddings() returning a word "
            "embedding; prompt tuning and P-tuning put virtual tokens among them"
        )
    if "inputs_embeds" not in inspect.signature(model.forward).parameters:
        raise UnsupportedLayerError(f"{type(model).__name__}.forward takes no inputs_embeds argument")
    return embeddings


def _cache_arg(model: nn.Module) -> str:
    """The forward argument taking a key/value cache, on the model or (through **kwargs) its backbone."""
    params = inspect.signature(model.forward).parameters
    backbone = getattr(model, "base_model", None)
    passes_on = any(p.kind is p.VAR_KEYWORD for p in params.values()) and isinstance(backbone, nn.Module)
    for group in (params, inspect.signature(backbone.forward).parameters if passes_on else {}):
        for name in _CACHE_ARGS:
            if name in group:
                return name
    raise UnsupportedLayerError(
        f"{type(model).__name__}.forward accepts no key/value cache ({' or '.join(_CACHE_ARGS)}), which "
        "prefix tuning fills with its prefix; use prompt tuning or P-tuning for this model"
    )


def _task_type(model: nn.Module) -> str:
    # Recorded in the saved config: the reference library picks its model wrapper (and so whether the
    # prompt is used at all) from it.
    name = type(model).__name__
    for ending, task in (
        ("ForCausalLM", "CAUSAL_LM"),
        ("LMHeadModel", "CAUSAL_LM"),
        ("ForSequenceClassification", "SEQ_CLS"),
        ("ForTokenClassification", "TOKEN_CLS"),
        ("ForQuestionAnswering", "QUESTION_ANS"),
    ):
        if name.endswith(ending):
            return task
    return "FEATURE_EXTRACTION"


# -- the model-level part and its hooks ---------------------------------------------------------------


class PromptPart(ModelPart):
    """One soft-prompt adapter: its trainable tensors, and the forward hooks that show them to the model.

    ``embedding`` holds the virtual tokens' trainable embeddings; ``encoder`` (P-tuning's prompt encoder,
    prefix tuning's projection, or None) maps them to what the model sees. :meth:`table` is that result,
    one row per virtual token, and is what gets saved.
    """

    exclusive = True  # each prepends its own virtual tokens: one soft prompt active at a time

    def __init__(self, embedding: nn.Embedding, encoder: nn.Module | None, num_virtual_tokens: int) -> None:
        super().__init__()
        self.embedding = embedding
        self.encoder = encoder
        self.num_virtual_tokens = num_virtual_tokens
        self._handles: list = []
        self._injected: Any = None  # weakref to the inputs_embeds this part built for the current call

    def table(self) -> torch.Tensor:
        """What the model sees, one row per virtual token (differentiable)."""
        weight = self.embedding.weight
        return weight if self.encoder is None else self.encoder(weight.unsqueeze(0))[0]

    def interchange_state(self, portable: bool = False) -> dict[str, torch.Tensor]:
        if self.encoder is None:
            return {KEY: self.embedding.weight}  # the live tensor: a load copies into it
        was = self.encoder.training
        self.encoder.eval()  # the saved table must not be one dropout sample
        try:
            with torch.no_grad():
                return {KEY: self.table().detach().clone()}
        finally:
            self.encoder.train(was)

    def loaded(self, tensors: dict[str, torch.Tensor]) -> None:
        # A file holds the encoder's output, not the encoder: loaded for training (is_trainable=True), the
        # adapter continues as that table, trained directly.
        saved = tensors.get(KEY)
        if saved is None or self.encoder is None:
            return
        old = self.embedding.weight
        table = saved.detach().to(device=old.device, dtype=old.dtype).clone()
        self.embedding = nn.Embedding.from_pretrained(table, freeze=not old.requires_grad)
        self.encoder = None

    # -- hooks ------------------------------------------------------------------------------------------

    def attach(self, model: nn.Module) -> None:
        self._handles = [
            model.register_forward_pre_hook(self._before, with_kwargs=True),
            model.register_forward_hook(self._after, with_kwargs=True),
        ]

    def detach(self, model: nn.Module) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _before(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not self.enabled:
            return None
        kwargs = _as_kwargs(model, args, kwargs)
        inputs = kwargs.get("input_ids")
        inputs = kwargs.get("inputs_embeds") if inputs is None else inputs
        if inputs is None:
            return (), kwargs  # the model raises its own error
        cache = next((kwargs[a] for a in _CACHE_ARGS if kwargs.get(a) is not None), None)
        past = cache.get_seq_length() if cache is not None else 0
        if past:
            _continue(kwargs, self.num_virtual_tokens, past, inputs.shape[1])
        else:
            self._first(model, kwargs, inputs, cache)
        return (), kwargs

    def _first(self, model: nn.Module, kwargs: dict, inputs: torch.Tensor, cache: Any) -> None:
        """Show the virtual tokens to a call that starts a sequence (``inputs``: its ids or embeddings)."""
        raise NotImplementedError

    def _after(self, model: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        ref, self._injected = self._injected, None
        embeds = kwargs.get("inputs_embeds")
        if ref is None or embeds is None or ref() is not embeds:
            return None
        return _trim(output, self.num_virtual_tokens, embeds.shape[1])


class SoftPromptPart(PromptPart):
    """Prompt tuning and P-tuning: virtual tokens prepended to the input embeddings."""

    def _first(self, model: nn.Module, kwargs: dict, inputs: torch.Tensor, cache: Any) -> None:
        n, (batch, length) = self.num_virtual_tokens, inputs.shape[:2]
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = model.get_input_embeddings()(kwargs["input_ids"])
        prompts = self.table().to(device=embeds.device, dtype=embeds.dtype)
        embeds = torch.cat([prompts.unsqueeze(0).expand(batch, -1, -1), embeds], dim=1)
        kwargs["input_ids"], kwargs["inputs_embeds"] = None, embeds
        self._injected = weakref.ref(embeds)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            kwargs["attention_mask"] = _prepend(_two_d(mask), n, 1)
        if kwargs.get("token_type_ids") is not None:
            kwargs["token_type_ids"] = _prepend(kwargs["token_type_ids"], n, 0)
        positions = kwargs.get("position_ids")
        if positions is not None:  # virtual tokens take positions 0..n-1, the input's shift by n
            virtual = torch.arange(n, device=positions.device, dtype=positions.dtype)
            virtual = virtual.expand(positions.shape[0], n)
            kwargs["position_ids"] = torch.cat([virtual, positions + n], dim=1)
        labels = kwargs.get("labels")
        if (
            isinstance(labels, torch.Tensor)
            and labels.dim() == 2
            and labels.shape[1] == length
            and (not labels.is_floating_point())
        ):  # token labels (language modelling, tagging): nothing to predict at virtual positions
            kwargs["labels"] = _prepend(labels, n, -100)


class PrefixPart(PromptPart):
    """Prefix tuning: every attention layer's cache starts with the prefix's keys and values."""

    def __init__(
        self,
        embedding: nn.Embedding,
        encoder: nn.Module | None,
        num_virtual_tokens: int,
        shape: tuple[int, int, int],
        cache_arg: str,
    ) -> None:
        super().__init__(embedding, encoder, num_virtual_tokens)
        self.shape = shape  # (layers, key/value heads, head_dim)
        self.cache_arg = cache_arg

    def _first(self, model: nn.Module, kwargs: dict, inputs: torch.Tensor, cache: Any) -> None:
        n, (layers, heads, head_dim), batch = self.num_virtual_tokens, self.shape, inputs.shape[0]
        words = model.get_input_embeddings().weight  # keys and values in the hidden states' dtype
        # Flat row layout (the reference's): [layer][key, value][head][head_dim] per virtual token.
        kv = self.table().to(device=words.device, dtype=words.dtype)
        kv = kv.view(n, layers, 2, heads, head_dim).permute(1, 2, 3, 0, 4)  # layers, 2, heads, n, head_dim
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=model.config)
        for layer in range(layers):
            keys, values = (kv[layer, i].unsqueeze(0).expand(batch, -1, -1, -1) for i in (0, 1))
            cache.update(keys, values, layer)
        for name in _CACHE_ARGS:
            kwargs.pop(name, None)
        kwargs[self.cache_arg] = cache
        mask = kwargs.get("attention_mask")
        if mask is None:  # encoders size their mask from it: "no mask" must cover the prefix too
            mask = torch.ones(inputs.shape[:2], dtype=torch.long, device=inputs.device)
        kwargs["attention_mask"] = _prepend(_two_d(mask), n, 1)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + n


def _continue(kwargs: dict, n: int, past: int, length: int) -> None:
    """A call whose cache already holds the virtual tokens (and ``past - n`` of the user's): extend the
    user's mask and positions over them."""
    mask = kwargs.get("attention_mask")
    if mask is not None:
        mask = _two_d(mask)
        if mask.shape[1] == past - n + length:
            kwargs["attention_mask"] = _prepend(mask, n, 1)
        elif mask.shape[1] != past + length:
            raise ValueError(
                f"attention_mask has {mask.shape[1]} columns, but the cache holds {past} positions ({n} of "
                f"them virtual tokens) and the input {length}: expected {past - n + length} (the user's "
                f"tokens) or {past + length}"
            )
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"] + n


def _prepend(tensor: torch.Tensor, n: int, value: int) -> torch.Tensor:
    pad = torch.full((tensor.shape[0], n), value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([pad, tensor], dim=1)


def _two_d(mask: torch.Tensor) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        got = getattr(mask, "shape", mask)
        raise ValueError(
            f"soft prompts extend a 2-D (batch, length) attention mask; got {got}. Pass the "
            "tokenizer's attention_mask instead."
        )
    return mask


def _trim(value: Any, n: int, total: int) -> Any:
    """Drop the virtual positions from token-level outputs (logits, hidden states): dimension 1 of
    length ``total``. Attention maps and the cache keep them (the cache must, for generation)."""
    if isinstance(value, torch.Tensor):
        return value[:, n:] if value.dim() >= 3 and value.shape[1] == total else value
    if isinstance(value, tuple) and not hasattr(value, "keys"):
        return tuple(_trim(v, n, total) for v in value)
    if hasattr(value, "keys") and hasattr(value, "__setitem__"):
        for key in list(value.keys()):
            if "attention" not in key and key not in _CACHE_ARGS:
                value[key] = _trim(value[key], n, total)
    return value


def _as_kwargs(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """Positional arguments as keywords, so the hook can find input_ids wherever the user passed them."""
    if not args:
        return dict(kwargs)
    signature = inspect.signature(model.forward)
    out: dict = {}
    for name, value in signature.bind_partial(*args, **kwargs).arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(
                f"{type(model).__name__}: with soft prompts, pass extra positional arguments by keyword"
            )
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return out

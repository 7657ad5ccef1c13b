"""Soft prompts: what prompt tuning, P-tuning and prefix tuning share. They train no weight of the model.

Each method has its own file (``prompt_tuning.py``, ``p_tuning.py``, ``prefix_tuning.py``: its config and
how it builds its part); this one holds their common config fields and the hook machinery.

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
import weakref
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..core.layer import ModelPart
from ..errors import ConfigError, UnsupportedLayerError

KEY = "prompt_embeddings"  # the one tensor the interchange format holds for all three methods
# AdapterConfig fields that choose layers; these methods choose none, and the reference format lacks them.
_LAYER_FIELDS = (
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
)
CACHE_ARGS = ("cache", "past_key_values")  # transformers >= 5.x renamed past_key_values to cache


def positive_int(value: Any) -> bool:
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
        if not positive_int(self.num_virtual_tokens):
            out.append(
                f"num_virtual_tokens: required, a positive integer (e.g. 20); got {self.num_virtual_tokens!r}"
            )
        for name in ("token_dim", "num_attention_heads", "num_layers", "encoder_hidden_size"):
            value = getattr(self, name, None)
            if value is not None and not positive_int(value):
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
        cache = next((kwargs[a] for a in CACHE_ARGS if kwargs.get(a) is not None), None)
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
            kwargs["attention_mask"] = prepend(two_d(mask), n, 1)
        if kwargs.get("token_type_ids") is not None:
            kwargs["token_type_ids"] = prepend(kwargs["token_type_ids"], n, 0)
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
            kwargs["labels"] = prepend(labels, n, -100)


def _continue(kwargs: dict, n: int, past: int, length: int) -> None:
    """A call whose cache already holds the virtual tokens (and ``past - n`` of the user's): extend the
    user's mask and positions over them."""
    mask = kwargs.get("attention_mask")
    if mask is not None:
        mask = two_d(mask)
        if mask.shape[1] == past - n + length:
            kwargs["attention_mask"] = prepend(mask, n, 1)
        elif mask.shape[1] != past + length:
            raise ValueError(
                f"attention_mask has {mask.shape[1]} columns, but the cache holds {past} positions ({n} of "
                f"them virtual tokens) and the input {length}: expected {past - n + length} (the user's "
                f"tokens) or {past + length}"
            )
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"] + n


def prepend(tensor: torch.Tensor, n: int, value: int) -> torch.Tensor:
    pad = torch.full((tensor.shape[0], n), value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([pad, tensor], dim=1)


def two_d(mask: torch.Tensor) -> torch.Tensor:
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
            if "attention" not in key and key not in CACHE_ARGS:
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


# `from peftkit.methods.prompt import PromptTuningConfig` is what users were told before each method got
# its own file; those names still resolve here (lazily: the method files import this one).
_MOVED = {
    "PromptTuningConfig": "prompt_tuning",
    "PromptEncoderConfig": "p_tuning",
    "PrefixTuningConfig": "prefix_tuning",
}


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__package__}.{_MOVED[name]}"), name)

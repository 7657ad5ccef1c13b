"""Prefix tuning (Li & Liang 2021, arXiv:2101.00190): trainable keys and values in front of every
attention layer, put in the key/value cache before the first call. With ``prefix_projection`` they come
from a small embedding through a tanh MLP, the paper's reparameterisation, which it found to stabilise
training. The hooks shared with prompt tuning are in ``prompt.py``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.registry import register_method
from ..errors import UnsupportedLayerError
from .prompt import CACHE_ARGS, PromptLearningConfig, PromptPart, prepend, two_d


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

    pick_when = "you generate with a decoder or seq2seq model and want trained keys and values in every layer, without changing any weight"

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


def _cache_arg(model: nn.Module) -> str:
    """The forward argument taking a key/value cache, on the model or (through **kwargs) its backbone."""
    params = inspect.signature(model.forward).parameters
    backbone = getattr(model, "base_model", None)
    passes_on = any(p.kind is p.VAR_KEYWORD for p in params.values()) and isinstance(backbone, nn.Module)
    for group in (params, inspect.signature(backbone.forward).parameters if passes_on else {}):
        for name in CACHE_ARGS:
            if name in group:
                return name
    raise UnsupportedLayerError(
        f"{type(model).__name__}.forward accepts no key/value cache ({' or '.join(CACHE_ARGS)}), which "
        "prefix tuning fills with its prefix; use prompt tuning or P-tuning for this model"
    )


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
        for name in CACHE_ARGS:
            kwargs.pop(name, None)
        kwargs[self.cache_arg] = cache
        mask = kwargs.get("attention_mask")
        if mask is None:  # encoders size their mask from it: "no mask" must cover the prefix too
            mask = torch.ones(inputs.shape[:2], dtype=torch.long, device=inputs.device)
        kwargs["attention_mask"] = prepend(two_d(mask), n, 1)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + n

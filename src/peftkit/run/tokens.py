"""New tokens in a run (``data.add_special_tokens``): which methods can train them, and what they train.

The task adds the tokens to the tokenizer and grows the model's embeddings (``tasks/causal_lm.py``); here
the adapter gets their rows to train: in the input embedding, and in the output head too when the head is
not tied to it (a chat model must learn to *emit* ``<|im_end|>``, and an untrained head row would also make
the saved adapter depend on how the loading side initialised it). A tied head follows the embedding by
itself. The adapter's method says how through ``with_trained_tokens`` (LoRA: ``trainable_token_indices``;
trainable tokens: ``token_indices`` and ``target_modules``); full fine-tuning trains every row anyway.
"""

from __future__ import annotations

from torch import nn

from ..core import registry
from ..core.anatomy import user_modules
from ..core.config import AdapterConfig
from ..core.registry import FULL_FINE_TUNING


def token_problems(tokens: list[str] | None, method: str) -> list[str]:
    """Why ``adapter.method`` cannot take ``data.add_special_tokens`` (empty when it can, or nothing is added)."""
    if not tokens or method == FULL_FINE_TUNING:
        return []
    try:
        config_cls = registry.find_method(method).config_cls
    except KeyError:  # the adapter section's own check names the unknown method
        return []
    if config_cls.trains_tokens:
        return []
    able = registry.methods_with("trains_tokens")
    return [
        f"data.add_special_tokens: adapter.method {method!r} cannot train the new tokens' embedding rows, which "
        f"would stay as initialised (the mean of the other rows); use method {' or '.join(able)}, or full "
        "fine-tuning (method: full)"
    ]


def token_layers(model: nn.Module) -> list[str]:
    """The full names of the modules whose rows a new token needs: the input embedding, then the output
    head when it does not hold the embedding's very weight."""
    names = {id(m): n for n, m in user_modules(model)}
    embedding = model.get_input_embeddings()
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    layers = [names[id(embedding)]]
    if head is not None and id(head) in names and head.weight is not embedding.weight:
        layers.append(names[id(head)])
    return layers


def with_new_tokens(config: AdapterConfig, model: nn.Module, ids: list[int]) -> AdapterConfig:
    """``config`` also training the rows of token ``ids`` (see :func:`token_layers`)."""
    return config.with_trained_tokens(list(ids), token_layers(model))

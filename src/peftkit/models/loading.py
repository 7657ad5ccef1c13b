"""Loading a transformers model and its tokenizer as a run's ``model`` section says: where from (a
bundled name, a local directory, a hub id), in which dtype, from which GGUF file, quantized or not.

Every task that loads a transformers model goes through here, so the section means the same for all of
them; the task adds only what is its own (a classification head, the check that a seq2seq model has an
encoder and a decoder).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import bundled_model_path, explain_missing, quiet_transformers
from .config import DTYPE_NAMES, ModelConfig

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}  # model.dtype -> torch dtype


def model_source(model: ModelConfig) -> str:
    """A local directory (a bundled model's, or the given one) or a hub id."""
    return bundled_model_path(model.name_or_path) or model.name_or_path


def pretrained_kwargs(model: ModelConfig, keep_dense: list[str]) -> dict[str, Any]:
    """Keyword arguments of ``from_pretrained`` for the section: dtype, GGUF file and quantization.

    ``keep_dense`` names the modules a quantized load leaves unquantized (a fresh head, ``lm_head``):
    naming them replaces transformers' own default list, so every one must be named.
    """
    kwargs: dict[str, Any] = {"dtype": DTYPES[model.dtype]}
    if model.gguf_file:
        kwargs["gguf_file"] = model.gguf_file
    if model.quantize:
        from ..backends.bitsandbytes import bnb_config

        kwargs["quantization_config"] = bnb_config(
            model.quantize, model.double_quant, DTYPES[model.dtype], keep_dense
        )
    return kwargs


def prepare_quantized(loaded: nn.Module, model: ModelConfig) -> None:
    """Make a model loaded quantized ready for adapter training (nothing for an unquantized one)."""
    if model.quantize:
        from ..backends.kbit import prepare_for_kbit_training

        prepare_for_kbit_training(loaded)


def load_pretrained(
    auto_class: Any,
    model: ModelConfig,
    source: str,
    load_tokenizer: Callable[[], Any],
    keep_dense: list[str],
) -> nn.Module:
    """``auto_class.from_pretrained(source)`` as the section says, quietly, with the tokenizer; the model's
    pad id is the tokenizer's where its config has none.

    Raises:
        OSError: the model cannot be found (the message says where it was looked for).
    """
    kwargs = pretrained_kwargs(model, keep_dense)
    with quiet_transformers(), explain_missing(model.name_or_path):
        loaded = auto_class.from_pretrained(source, **kwargs)
        tokenizer = load_tokenizer()
    prepare_quantized(loaded, model)
    if loaded.config.pad_token_id is None:
        loaded.config.pad_token_id = tokenizer.pad_token_id
    return loaded


def load_tokenizer(model: ModelConfig, source: str) -> Any:
    """The tokenizer at ``source`` (from ``model.gguf_file`` when set), with a pad token (EOS when it has none).

    Raises:
        OSError: the tokenizer cannot be found.
    """
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": model.gguf_file} if model.gguf_file else {}
    with quiet_transformers(), explain_missing(model.name_or_path):
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if tokenizer.pad_token is None:  # decoders often have none; batches need one (positions are masked)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def add_tokens(tokenizer: Any, tokens: list[str]) -> list[int]:
    """Add ``tokens`` to ``tokenizer`` as special tokens (never split, left out of decoded text) where it lacks
    them; returns the ids of all of them, in order (tokens it already had keep their ids)."""
    tokenizer.add_tokens(list(tokens), special_tokens=True)
    return [int(i) for i in tokenizer.convert_tokens_to_ids(list(tokens))]


def grow_embeddings(model: nn.Module, size: int) -> int:
    """Give ``model``'s token embeddings (and an output head not tied to them) ``size`` rows when they have
    fewer; returns how many rows were added.

    New rows start at the mean of the existing rows of the same matrix: a neutral start (a new token
    neither dominates the output nor sits far from every other input), and a deterministic one, unlike
    transformers' own ``mean_resizing``, which samples them, so a rebuilt run gets the same base model.
    """
    embedding = model.get_input_embeddings()
    old = embedding.weight.shape[0]
    if size <= old:
        return 0
    model.resize_token_embeddings(size, mean_resizing=False)
    heads = [model.get_input_embeddings(), model.get_output_embeddings()]
    grown = {id(m.weight): m.weight for m in heads if m is not None and m.weight.shape[0] == size}
    with torch.no_grad():
        for weight in grown.values():  # a tied pair is one tensor: written once
            weight[old:] = weight[:old].float().mean(dim=0, keepdim=True).to(weight.dtype)
    return size - old

"""Backend-neutral helpers for quantized ("k-bit") base models: training preparation and export.

They act on whatever layers a backend registered a :class:`~peftkit.core.registry.BaseAccess` for, so
they import no quantization library themselves.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core import registry
from ..core.layer import AdapterLayer

_HALF = (torch.float16, torch.bfloat16)


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every quantized layer a backend knows in ``model``."""
    return [(n, m) for n, m in model.named_modules() if registry.base_access(m) is not None]


def prepare_for_kbit_training(model: nn.Module, gradient_checkpointing: bool = False) -> nn.Module:
    """Make a quantized base model ready for adapter training, in place.

    * Every quantized layer is made able to back-propagate (bitsandbytes' AVX512-BF16 CPU inference
      kernel, which it switches to after an eval-mode forward, has no backward pass).
    * Every parameter that is not quantized and is in float16/bfloat16 (normalisation layers, the
      classifier head, embeddings, biases) becomes float32: LayerNorm/RMSNorm statistics and the
      loss's logits lose too much in half precision, and they are a small part of the memory.
    * Every base parameter is frozen (adapters added later by :func:`peftkit.inject` are float32 by
      default on a quantized layer, and trainable).
    * The input embedding's output is made to require grad (transformers'
      ``enable_input_require_grads``, else a forward hook on the first ``nn.Embedding``): reentrant
      gradient checkpointing back-propagates through a checkpointed block only if one of its inputs
      requires grad, which a frozen embedding's output otherwise never does.
    * With ``gradient_checkpointing`` it is switched on (non-reentrant) through transformers.

    Args:
        model: A model holding quantized layers (from :func:`peftkit.quantize` or transformers).
        gradient_checkpointing: Also turn on transformers' activation checkpointing.

    Returns:
        The same model object.

    Raises:
        TypeError: ``gradient_checkpointing`` was asked for a model that is not a transformers model.
    """
    layers = [m for _, m in quantized_layers(model)]
    for layer in layers:  # e.g. off an inference-only kernel, so gradients reach earlier adapters
        access = registry.base_access(layer)
        if access.trainable is not None:
            access.trainable(layer)
    quantized = {id(p) for m in layers for n, p in m.named_parameters() if n == "weight"}
    for param in model.parameters():
        param.requires_grad_(False)
        if id(param) not in quantized and param.dtype in _HALF:
            param.data = param.data.float()
    enable = getattr(model, "enable_input_require_grads", None)
    if callable(enable):
        enable()
    else:
        embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
        if embedding is not None and not getattr(embedding, "_peftkit_grad_hook", None):
            embedding._peftkit_grad_hook = embedding.register_forward_hook(
                lambda _m, _i, out: out.requires_grad_(True)
            )
    if gradient_checkpointing:
        owner = next((m for m in model.modules() if hasattr(m, "gradient_checkpointing_enable")), None)
        if owner is None:
            raise TypeError(
                f"gradient_checkpointing=True needs a transformers model; {type(model).__name__} has no "
                "gradient_checkpointing_enable(). Wrap your blocks in torch.utils.checkpoint yourself."
            )
        kwargs = {"use_reentrant": False}
        if hasattr(owner, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed it
            owner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            owner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def dequantize(model: nn.Module) -> nn.Module:
    """Replace every quantized layer of ``model`` (also those under adapters) by a dense ``nn.Linear``
    in the layer's compute dtype, in place; the weights are the dequantized ones, exactly.

    A transformers model also forgets its quantization config, so ``save_pretrained`` writes a plain
    16/32-bit checkpoint.
    """
    for name, module in quantized_layers(model):
        dense = registry.base_access(module).dense(module)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, dense)
    for module in model.modules():
        if isinstance(module, AdapterLayer):
            module.quantization_error = None
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    return model

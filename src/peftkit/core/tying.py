"""Weights several modules share (tied input and output embeddings), and keeping adapters honest about them.

Many decoders use one matrix as their input embedding and their output projection
(``config.tie_word_embeddings``; in PyTorch the two modules hold the *same* ``nn.Parameter``). Anything
written into that tensor changes both sides. That is what a tie means for an adapter whose change is
meant for both (trainable tokens: a token's row is its input vector and its output weight; such an
adapter declares ``keeps_ties`` and its method adapts every module holding the weight), but a silent
error for any other: merging LoRA on ``embed_tokens`` of a tied model would also rewrite ``lm_head``, and
the merged model would compute something else than the adapted one (the reference library warns and
does it anyway; transformers issue #45127 is what users then meet).

So the core finds shared weights by identity (what the model computes with, whatever its config says),
and:

- refuses a merge that writes into a shared weight, before anything changes, unless the caller asks to
  ``untie``: the other holders get their own copy of the weight first, and the configs that declared
  the tie (``tie_word_embeddings``) say False, so saving and reloading keep both matrices;
- refuses an init that rewrites a shared weight at inject (PiSSA / OLoRA on a tied ``lm_head``);
- after ``unload(merge=True)``, sets ``tie_word_embeddings`` False where the input and output embeddings
  no longer share their weight (a ``modules_to_save`` copy of a tied embedding took its place), since
  ``save_pretrained`` and tools that convert checkpoints trust that flag.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import TiedWeightsError, UnsupportedLayerError
from .anatomy import user_modules


def shared_weights(model: nn.Module) -> dict[int, list[str]]:
    """``id(parameter)`` -> the full names (``"lm_head.weight"``) under which different modules of
    ``model`` hold it, for every parameter held by more than one module (the model as the user sees
    it: an adapted layer stands for its base layer)."""
    names: dict[int, list[str]] = {}
    owners: dict[int, set[int]] = {}
    for module_name, module in user_modules(model):
        for pname, param in module._parameters.items():
            if param is None or id(module) in owners.get(id(param), set()):
                continue
            owners.setdefault(id(param), set()).add(id(module))
            names.setdefault(id(param), []).append(f"{module_name}.{pname}" if module_name else pname)
    return {key: found for key, found in names.items() if len(found) > 1}


def tied_with(
    model: nn.Module, module: nn.Module, tensor: str, shared: dict[int, list[str]] | None = None
) -> list[str]:
    """The other full names holding ``module``'s parameter ``tensor`` (empty when it is not shared)."""
    param = module._parameters.get(tensor)
    if param is None:
        return []
    shared = shared_weights(model) if shared is None else shared
    holders = shared.get(id(param), [])
    if not holders:
        return []
    mine = {f"{name}.{tensor}" if name else tensor for name, m in user_modules(model) if m is module}
    return [n for n in holders if n not in mine]


def refuse_rewritten_ties(model: nn.Module, built: Iterable[tuple[Any, Any]]) -> None:
    """At inject: refuse an adapter whose init rewrites a shared base weight (PiSSA / OLoRA residuals on a
    tied output head would rewrite the input embedding too)."""
    shared: dict[int, list[str]] | None = None
    for target, adapter in built:
        if not adapter.rewrites_base or adapter.keeps_ties:
            continue
        shared = shared_weights(model) if shared is None else shared
        for tensor in adapter.merge_into:
            others = tied_with(model, target.module, tensor, shared)
            if others:
                raise UnsupportedLayerError(
                    f"{target.name}: this init rewrites the base {tensor}, which {', '.join(others)} shares (tied "
                    "weights), so it would change that module too. Use another init (init_lora_weights=True), or "
                    "untie the weights before inject (load the model with tie_word_embeddings=False and give the "
                    "output head a copy of the embedding)."
                )


@dataclass
class TiedMerge:
    """A merge about to write into a weight other modules share."""

    adapter: str
    module: str  # the adapted layer's name
    tensor: str  # "weight"
    others: list[str]  # the other holders' full names, "lm_head.weight"


def tied_merges(model: nn.Module, layers: list[tuple[Any, list[str]]]) -> list[TiedMerge]:
    """The merges of ``layers`` (``(AdapterLayer, adapter names about to be merged)``) that would write
    into a weight another module holds, by an adapter that does not declare ``keeps_ties``."""
    shared = shared_weights(model)
    if not shared:
        return []
    found = []
    for layer, names in layers:
        for name in names:
            adapter = layer.adapters[name]
            if name in layer.merged or adapter.keeps_ties:
                continue
            for tensor in adapter.merge_into:
                others = tied_with(model, layer.base_layer, tensor, shared)
                if others:
                    found.append(TiedMerge(name, layer.module_name, tensor, others))
    return found


def refuse(found: list[TiedMerge]) -> None:
    """Raise :class:`TiedWeightsError` for the first of ``found``, naming the fix."""
    if found:
        first = found[0]
        raise TiedWeightsError(
            f"cannot merge adapter {first.adapter!r} into {first.module!r}: its {first.tensor} is the same tensor "
            f"as {', '.join(first.others)} (tied weights), so the merge would change that module too and the "
            "merged model would compute something else than the adapted one. Pass untie=True to merge/unload "
            "(the other module gets its own copy of the weight first and config.tie_word_embeddings becomes "
            "False, so a saved model stores both), or keep the adapter unmerged; nothing was changed."
            + (f" ({len(found)} such merges in all)" if len(found) > 1 else "")
        )


def untie(model: nn.Module, found: list[TiedMerge]) -> list[str]:
    """Give every other holder of each weight in ``found`` its own (frozen, equal) copy, so that merging
    changes the adapted layer alone; then settle the configs' tie flags. Returns the holders untied."""
    modules = dict(user_modules(model))
    untied: list[str] = []
    for item in found:
        param = modules[item.module]._parameters[item.tensor]
        for holder in item.others:
            owner, _, pname = holder.rpartition(".")
            module = modules[owner] if owner else model
            if module._parameters.get(pname) is param:  # not untied already by an earlier item
                module._parameters[pname] = nn.Parameter(
                    param.detach().clone(), requires_grad=param.requires_grad
                )
                untied.append(holder)
    settle_tie_flags(model)
    return untied


def settle_tie_flags(model: nn.Module) -> list[str]:
    """Set ``tie_word_embeddings`` False on the configs of ``model`` (and of the transformers models inside
    it) whose input and output embeddings no longer hold one tensor; returns the class names changed.

    transformers' ``save_pretrained`` and converters trust the flag: left True, a later ``tie_weights()``
    or a tool reading the file would put one matrix in place of the other."""
    changed = []
    for module in model.modules():
        config = getattr(module, "config", None)
        get_in, get_out = (
            getattr(module, "get_input_embeddings", None),
            getattr(module, "get_output_embeddings", None),
        )
        if config is None or not callable(get_in) or not callable(get_out):
            continue
        configs = [config]
        text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else None
        if text is not None and text is not config:
            configs.append(text)
        if not any(getattr(c, "tie_word_embeddings", False) for c in configs):
            continue
        try:
            inputs, outputs = get_in(), get_out()
        except (NotImplementedError, AttributeError):
            continue
        if inputs is None or outputs is None:
            continue
        if getattr(inputs, "weight", None) is getattr(outputs, "weight", None):
            continue
        for c in configs:
            if getattr(c, "tie_word_embeddings", False):
                c.tie_word_embeddings = False
        tied = getattr(module, "all_tied_weights_keys", None)
        if isinstance(tied, dict):  # transformers 5 caches the mapping its tie_weights() may reuse
            held = {
                f"{name}.{p}" if name else p: param
                for name, sub in user_modules(module)
                for p, param in sub._parameters.items()
            }
            for target, source in list(tied.items()):
                if target in held and source in held and held[target] is not held[source]:
                    del tied[target]
        changed.append(type(module).__name__)
    return changed

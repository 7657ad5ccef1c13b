"""An adapter's tensors under the interchange format's key names, and strict loading of them.

Keys are built by walking adapter layers and asking each adapter module for its own tensors
(``interchange_state``), never by matching substrings of parameter names.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import AdapterFileError, AdapterMismatchError
from . import tying
from .inject import adapter_layers, model_parts, require_adapter, saved_modules, state_of
from .targeting import user_modules

PREFIX = "base_model.model."


def _slots(
    model: nn.Module, adapter_name: str, portable: bool = False
) -> dict[str, tuple[torch.Tensor, str]]:
    """Key -> (the live tensor that holds it, its module's name), for every tensor the adapter saves."""
    state = require_adapter(model, adapter_name, AdapterMismatchError)
    prefix = state.configs[adapter_name].state_key_prefix
    slots: dict[str, torch.Tensor] = {}
    for name, layer in adapter_layers(model):
        if adapter_name in layer.adapters:
            for suffix, tensor in layer.adapters[adapter_name].interchange_state(portable).items():
                slots[f"{prefix}{name}.{suffix}"] = (tensor, name)
    for name, wrapper in saved_modules(model):
        if adapter_name in wrapper.copies:
            for suffix, tensor in wrapper.copies[adapter_name].state_dict().items():
                slots[f"{prefix}{name}.{suffix}"] = (tensor, name)
    part = model_parts(model).get(adapter_name)
    if part is not None:
        for key, tensor in part.interchange_state(portable).items():
            slots[key] = (tensor, "")
    names = _canonical_names(model, adapter_name)
    for param in state.extra_trainable.get(adapter_name, []):
        slots[prefix + names[id(param)]] = (param, names[id(param)].rpartition(".")[0])
    return slots


def _canonical_names(model: nn.Module, adapter_name: str) -> dict[int, str]:
    """Parameter names as on a model holding only this adapter (the reference library's names):
    ``<m>.base_layer.<p>`` inside layers this adapter adapts, plain ``<m>.<p>`` everywhere else, so a
    saved file does not depend on which other adapters were present."""
    own = {id(layer.base_layer) for _, layer in adapter_layers(model) if adapter_name in layer.adapters}
    names: dict[int, str] = {}
    for module_name, module in user_modules(model):
        stem = f"{module_name}.base_layer" if id(module) in own else module_name
        for param_name, param in module._parameters.items():
            if param is not None:
                names.setdefault(id(param), f"{stem}.{param_name}" if stem else param_name)
    return names


def adapter_state_dict(
    model: nn.Module, adapter_name: str = "default", portable: bool = False
) -> dict[str, torch.Tensor]:
    """The tensors of one adapter, keyed as the reference library saves them (detached, not copied).

    ``portable=True`` expresses adapters whose init rewrote the base weights (PiSSA, OLoRA) relative
    to the original weights instead (see :func:`peftkit.save_adapter`).
    """
    return {key: tensor.detach() for key, (tensor, _) in _slots(model, adapter_name, portable).items()}


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def _normalise_reference_keys(
    tensors: dict[str, torch.Tensor], expected: set[str]
) -> dict[str, torch.Tensor]:
    # The reference library may also write its modules_to_save wrapper's internals
    # ("<m>.modules_to_save.<p>", "<m>.original_module.<p>") beside the plain "<m>.<p>" keys.
    out = {}
    for key, tensor in tensors.items():
        if key not in expected:
            for marker in (".modules_to_save.", ".original_module."):
                if marker in key:
                    plain = key.replace(marker, ".", 1)
                    if plain in expected:
                        if marker == ".modules_to_save." and plain not in tensors:
                            out[plain] = tensor
                        key = None
                        break
            if key is None:
                continue
        out[key] = tensor
    return out


def _split_saved_base_weights(
    model: nn.Module, tensors: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[tuple[str, torch.Tensor, torch.Tensor]]]:
    """Separate full base weights of adapted layers, which the reference library saves alongside
    embedding adapters ("<module>.base_layer.weight", in case the vocabulary was resized).

    Returns the remaining tensors and the (module, model weight, saved weight) triples that differ.
    """
    layers = dict(adapter_layers(model))
    rest, writes = {}, []
    for key, tensor in tensors.items():
        module = key[len(PREFIX) : -len(".base_layer.weight")] if key.endswith(".base_layer.weight") else None
        layer = layers.get(module) if module and key.startswith(PREFIX) else None
        if layer is None or not isinstance(getattr(layer.base_layer, "weight", None), torch.Tensor):
            rest[key] = tensor
            continue
        weight = layer.base_layer.weight
        if tensor.shape != weight.shape:
            raise AdapterMismatchError(
                f"{module}: the adapter file carries a full base weight of shape {tuple(tensor.shape)} but the "
                f"model's is {tuple(weight.shape)}; resize the model's embeddings to match before loading"
            )
        if not torch.equal(tensor.to(weight.dtype), weight.detach().cpu()):
            writes.append((module, weight, tensor))
    return rest, writes


def load_adapter_state_dict(
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    adapter_name: str = "default",
    strict: bool = True,
    check_only: bool = False,
) -> LoadReport:
    """Copy saved tensors into adapter ``adapter_name``; nothing is copied unless every check passes.

    With ``check_only`` the checks run (and raise) but nothing is copied.
    """
    slots = _slots(model, adapter_name)
    prefix = state_of(model).configs[adapter_name].state_key_prefix
    tensors = _normalise_reference_keys(tensors, set(slots))
    tensors, base_writes = _split_saved_base_weights(model, tensors)
    report = LoadReport(
        missing=sorted(set(slots) - set(tensors)), unexpected=sorted(set(tensors) - set(slots))
    )
    if strict and (report.missing or report.unexpected):
        raise AdapterMismatchError(
            f"adapter {adapter_name!r} does not fit this model: {len(report.missing)} missing key(s) "
            f"{_few(report.missing)}, {len(report.unexpected)} unexpected key(s) {_few(report.unexpected)}. "
            "Is it an adapter for a different model or config? Pass strict=False to load what fits."
        )
    shape_errors, dtype_errors, nonfinite = [], [], []
    for key in sorted(set(slots) & set(tensors)):
        (slot, module), saved = slots[key], tensors[key]
        if slot.shape != saved.shape:
            tensor_name = key[len(prefix) + len(module) + 1 :] if module else key
            shape_errors.append(
                f"{module}: saved {tuple(saved.shape)} vs model {tuple(slot.shape)} ({tensor_name})"
            )
        elif _kind(saved) != _kind(slot):
            # other float widths convert (a bf16 adapter onto an fp32 model); integers, booleans or
            # complex numbers read as weights would be silently meaningless values
            dtype_errors.append(f"{key}: saved as {saved.dtype}, the model holds {slot.dtype}")
        elif saved.is_floating_point() and not torch.isfinite(saved.float()).all():
            nonfinite.append(key)
    if shape_errors:
        raise AdapterMismatchError(
            f"adapter {adapter_name!r} has {len(shape_errors)} tensor(s) of the wrong shape for this model: "
            + "; ".join(shape_errors[:5])
            + ". It was saved from a model with different dimensions or a different rank."
        )
    if dtype_errors:
        raise AdapterFileError(
            f"refusing adapter {adapter_name!r}: {len(dtype_errors)} tensor(s) of the wrong kind of dtype: "
            + "; ".join(dtype_errors[:5])
            + ". The file is corrupt or was not written by an adapter library."
        )
    if nonfinite:
        raise AdapterFileError(
            f"refusing adapter {adapter_name!r}: non-finite values (NaN/inf) in {_few(nonfinite)}. Its training "
            "diverged; use an earlier checkpoint of it. (peftkit.core.io.read_adapter_tensors reads the raw tensors "
            "for inspection.)"
        )
    _check_shared_slots(adapter_name, slots, tensors)
    if check_only:
        return report
    with torch.no_grad():
        layers = dict(adapter_layers(model))
        for module, weight, saved in base_writes:
            tied = tying.tied_with(model, layers[module].base_layer, "weight")
            also = f"; {', '.join(tied)} holds the same tensor (tied) and changes with it" if tied else ""
            warnings.warn(
                f"the adapter file carries a base weight for {module!r} that differs from the model's; it "
                f"replaces the model's weight (as the reference library does) and stays after unload(){also}",
                stacklevel=3,
            )
            weight.copy_(saved.to(device=weight.device, dtype=weight.dtype))
        for key in sorted(set(slots) & set(tensors)):
            slot = slots[key][0]
            slot.copy_(tensors[key].to(device=slot.device, dtype=slot.dtype))
            report.loaded.append(key)
        part = model_parts(model).get(adapter_name)
        if part is not None:
            part.loaded({key: tensors[key] for key in report.loaded})
    return report


def _check_shared_slots(
    adapter_name: str, slots: dict[str, tuple[torch.Tensor, str]], tensors: dict[str, torch.Tensor]
) -> None:
    """Keys saved twice for one tensor (trainable tokens on tied embeddings write the embedding's rows under
    the output head too, as the reference does) must hold the same values: which copy to believe is not
    for a loader to guess."""
    by_tensor: dict[int, list[str]] = {}
    for key, (slot, _) in slots.items():
        if key in tensors:
            by_tensor.setdefault(id(slot), []).append(key)
    for keys in by_tensor.values():
        first = tensors[keys[0]]
        differ = [
            k for k in keys[1:] if tensors[k].shape != first.shape or not torch.equal(tensors[k], first)
        ]
        if differ:
            raise AdapterFileError(
                f"refusing adapter {adapter_name!r}: {keys[0]} and {differ[0]} are one tensor of this model (tied "
                "weights) but the file holds different values for them; it was edited, or saved from a model "
                "whose weights were not tied. Untie the model's weights to load each side separately."
            )


def _kind(tensor: torch.Tensor) -> str:
    if tensor.is_complex():
        return "complex"
    if tensor.is_floating_point():
        return "float"
    return "bool" if tensor.dtype == torch.bool else "integer"


def _few(keys: list[str], n: int = 5) -> str:
    return (
        "[]"
        if not keys
        else "[" + ", ".join(keys[:n]) + (f", ... {len(keys) - n} more" if len(keys) > n else "") + "]"
    )

"""``save_pretrained`` on a transformers model that holds peftkit adapters.

transformers' ``PreTrainedModel.save_pretrained`` writes ``model.state_dict()``. On an adapted model that
is every base weight under adapter-layer names (``query.base_layer.weight``), which ``from_pretrained``
cannot match: it reports the adapted layers and the head missing, initialises them at random, and
loads without an error. Since peftkit changes the user's own model instead of wrapping it, ``inject``
gives that *instance*, and every transformers model inside it, its own ``save_pretrained`` (an
instance attribute; ``unload`` removes it; the class and every other instance are untouched):

* on the model ``inject`` was called on, it writes the adapters in the interchange format, the files
  :func:`peftkit.save_adapter` writes (``modules_to_save`` copies included): adapter ``"default"`` in
  the directory itself, any other adapter in a sub-directory named after it. That is the reference
  library's layout, which ``PeftModel.from_pretrained`` and transformers' ``Trainer`` read;
* on a transformers model *inside* it that holds adapter layers (``model.bert`` when ``model`` was
  adapted) it refuses with :class:`~peftkit.errors.UnloadableCheckpointError`, naming the fixes;
* anywhere else it is the class's own method.

A model that holds adapters only *inside* it (``inject(model.bert, ...)``, then
``model.save_pretrained``) keeps its class's method, which would write the broken checkpoint; the
adapted module therefore refuses to give its state dict to transformers' own ``save_pretrained`` (a
state-dict pre-hook that looks for that call on the stack), naming the fixes.

transformers' ``Trainer.save_model`` and ``push_to_hub`` call ``model.save_pretrained``, so they write
the adapter too. A full plain model is written only when asked for:
``peftkit.unload(model, merge=True).save_pretrained(directory)``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import AdapterNameError, UnloadableCheckpointError
from .layer import AdapterLayer, ModelParts, ModulesToSave

ATTR = "save_pretrained"
DEFAULT_ADAPTER = "default"


def is_transformers_model(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers ``PreTrainedModel`` (found without importing transformers)."""
    return any(
        cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers.")
        for cls in type(module).__mro__
    )


def holds_adapters(module: nn.Module) -> bool:
    """Whether peftkit put adapter layers, trained copies or model-level parts anywhere inside ``module``."""
    return any(isinstance(m, (AdapterLayer, ModulesToSave, ModelParts)) for m in module.modules())


class SavePretrained:
    """The ``save_pretrained`` that :func:`install` sets on one transformers model instance.

    A callable object rather than a bound method: pickling a bound method re-reads the attribute while
    the model is half rebuilt (and so finds the class's method), whereas this object pickles and
    deep-copies along with its model.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        from .inject import is_adapted

        if is_adapted(self.module):
            return save_pretrained(self.module, save_directory, *args, **kwargs)
        if holds_adapters(self.module):
            name = type(self.module).__name__
            raise UnloadableCheckpointError(
                f"{name}.save_pretrained refused: this {name} is part of a model holding peftkit adapters, and "
                "would be written with its base weights under adapter-layer names ('...base_layer.weight') that "
                f"{name}.from_pretrained cannot load (it would initialise them at random, without an error). "
                "Call save_pretrained on the model you passed to peftkit.inject (it writes the adapter), or save "
                "a plain merged model: peftkit.unload(model, merge=True).save_pretrained(directory)."
            )
        return type(self.module).save_pretrained(self.module, save_directory, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<peftkit adapter-aware save_pretrained of {type(self.module).__name__}>"


def install(model: nn.Module) -> None:
    """Give ``model`` and every transformers model inside it the adapter-aware ``save_pretrained``, and
    ``model`` the guard against a containing model's own ``save_pretrained``."""
    for module in model.modules():
        if is_transformers_model(module) and ATTR not in module.__dict__:
            module.__dict__[ATTR] = SavePretrained(module)
    if refuse_transformers_save not in model._state_dict_pre_hooks.values():
        model.register_state_dict_pre_hook(refuse_transformers_save)


def uninstall(model: nn.Module) -> None:
    """Remove what :func:`install` set, giving each instance its class's ``save_pretrained`` back."""
    for module in model.modules():
        if isinstance(module.__dict__.get(ATTR), SavePretrained):
            del module.__dict__[ATTR]
        # by value, not by a stored handle: a deep copy of the model shares the handle's target dict
        for key in [
            k for k, hook in module._state_dict_pre_hooks.items() if hook is refuse_transformers_save
        ]:
            del module._state_dict_pre_hooks[key]


def refuse_transformers_save(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    """State-dict pre-hook of an adapted model: refuse when transformers' own ``save_pretrained`` (of
    a model containing this one, whose class method knows nothing of adapters) is asking.

    Raises:
        UnloadableCheckpointError: a transformers ``save_pretrained`` is on the call stack.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "save_pretrained" and frame.f_globals.get("__name__", "").startswith(
            "transformers."
        ):
            outer = frame.f_locals.get("self")
            name = type(outer).__name__ if outer is not None else "the model"
            raise UnloadableCheckpointError(
                f"{name}.save_pretrained refused: peftkit adapters were injected into a part of it "
                f"({type(module).__name__}{' at ' + repr(prefix.rstrip('.')) if prefix else ''}), and the whole model would be "
                "written with base weights under adapter-layer names that from_pretrained cannot load (it would "
                "initialise them at random, without an error). Inject into the model you save, call "
                "save_pretrained on the adapted part (it writes the adapter), or save a plain merged model: "
                "peftkit.unload(part, merge=True), then save_pretrained."
            )
        frame = frame.f_back


def adapter_directory(directory: str | os.PathLike, adapter_name: str) -> Path:
    """Where :func:`save_pretrained` puts adapter ``adapter_name`` of a save into ``directory``."""
    return Path(directory) if adapter_name == DEFAULT_ADAPTER else Path(directory) / adapter_name


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    is_main_process: bool = True,
    state_dict: dict[str, torch.Tensor] | None = None,
    push_to_hub: bool = False,
    *,
    selected_adapters: list[str] | None = None,
    **ignored: Any,
) -> Path:
    """Write ``model``'s adapters to ``save_directory`` in the interchange format; returns the directory.

    Args:
        model: A model holding peftkit adapters.
        save_directory: Adapter ``"default"`` goes into it, any other adapter into ``<dir>/<name>``.
        is_main_process: False on the other processes of a distributed run: nothing is written.
        state_dict: The full model's state dict (``model.state_dict()`` keys) to take the adapter tensors
            from instead of the live model, as distributed trainers pass a gathered one.
        push_to_hub: Refused: ``model.push_to_hub(repo_id)`` uploads what this method writes.
        selected_adapters: The adapters to write (default: all of them).
        ignored: Options of transformers' full-model save (``safe_serialization``, ``max_shard_size``,
            ``variant``, ``token`` ...), which do not apply to adapter files (always safetensors).

    Raises:
        UnloadableCheckpointError: ``state_dict`` lacks an adapter tensor, or ``push_to_hub=True``.
        AdapterNameError: a selected adapter is not on the model.
        AdapterMismatchError, AdapterFileError, SaveError: as :func:`peftkit.save_adapter`.
    """
    from .inject import state_of
    from .io import save_adapter, write_adapter

    if push_to_hub:
        raise UnloadableCheckpointError(
            "save_pretrained(..., push_to_hub=True) is not supported on a model holding peftkit adapters; call "
            "model.push_to_hub(repo_id), which uploads the adapter files this save_pretrained writes"
        )
    names = list(state_of(model).configs) if selected_adapters is None else list(selected_adapters)
    unknown = [n for n in names if n not in state_of(model).configs]
    if unknown or not names:
        raise AdapterNameError(
            f"cannot save adapters {unknown or names!r}; adapters on this model: "
            f"{sorted(state_of(model).configs)}"
        )
    if not is_main_process:
        return Path(save_directory)
    for name in names:
        target = adapter_directory(save_directory, name)
        if state_dict is None:
            save_adapter(model, target, name)
        else:
            write_adapter(model, target, name, _tensors_from_state_dict(model, name, state_dict))
    return Path(save_directory)


def _tensors_from_state_dict(
    model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Adapter ``adapter_name``'s interchange tensors, read from ``state_dict`` (keys of ``model.state_dict()``).

    Each interchange tensor is matched to its state-dict key through the storage it shares with the
    live model (a name mapping would depend on how each method lays its tensors out)."""
    from .state_dict import adapter_state_dict

    def where(t: torch.Tensor) -> tuple:
        return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride())

    keys: dict[tuple, str] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if tensor.numel():
            keys.setdefault(where(tensor), key)
    out, lost = {}, []
    for key, tensor in adapter_state_dict(model, adapter_name).items():
        full = keys.get(where(tensor)) if tensor.numel() else None
        if tensor.numel() == 0:
            out[key] = tensor  # a rank pruned to 0 (AdaLoRA): nothing to gather
        elif full is None or full not in state_dict:
            lost.append(full or key)
        else:
            out[key] = state_dict[full]
    if lost:
        raise UnloadableCheckpointError(
            f"save_pretrained(state_dict=...) refused: the state dict given lacks {len(lost)} tensor(s) of adapter "
            f"{adapter_name!r} (e.g. {lost[:3]}), or they are computed rather than stored (soft prompts), so the "
            "adapter written would be incomplete. Pass state_dict=None to save the live adapter, or call "
            "peftkit.save_adapter(model, directory) where the adapter's tensors are whole."
        )
    return out


def load_saved_adapters(
    model: nn.Module, directory: str | os.PathLike, adapter_names: list[str] | None = None
) -> None:
    """Copy adapters written by :func:`save_pretrained` into ``model``'s adapters of the same names, in place.

    The parameters stay the same objects (an optimizer holding them keeps working) and receive the saved
    values exactly, as when a checkpoint is resumed. Every adapter is read and checked before any is
    copied.

    Raises:
        FileNotFoundError: an adapter's files are not in ``directory`` (or its sub-directory).
        AdapterMismatchError: the saved tensors do not fit the model's adapter (keys, shapes).
        AdapterFileError: a file is corrupt or holds non-finite values.
    """
    from .inject import state_of
    from .io import read_adapter_tensors
    from .state_dict import load_adapter_state_dict

    names = list(state_of(model).configs) if adapter_names is None else list(adapter_names)
    saved = {name: read_adapter_tensors(adapter_directory(directory, name))[0] for name in names}
    for name, tensors in saved.items():
        load_adapter_state_dict(model, tensors, name, strict=True, check_only=True)
    for name, tensors in saved.items():
        load_adapter_state_dict(model, tensors, name, strict=True)

"""Putting adapters into a model in place, and taking them out again.

The user's own model object is changed and returned: targeted children are swapped for
:class:`AdapterLayer` wrappers that hold the original module, so ``unload`` can put the very same
objects back. Per-model bookkeeping lives in one plain attribute, ``model._peftkit``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import AdapterNameError, UnsupportedLayerError
from . import pretrained, tying
from .config import AdapterConfig
from .layer import AdapterLayer, AdapterModule, ModelPart, ModelParts, ModulesToSave
from .targeting import Plan, recorded_targets, resolve, sequence_head_names

STATE_ATTR = "_peftkit"
PARTS_ATTR = "peftkit_parts"


@dataclass
class PeftState:
    configs: dict[str, AdapterConfig] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    # adapter -> base parameters it trains and saves (e.g. biases under LoRA's bias="all"); kept as
    # objects, not names, because wrapping a layer later renames them (x.bias -> x.base_layer.bias)
    extra_trainable: dict[str, list[nn.Parameter]] = field(default_factory=dict)
    extra_originals: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    plans: dict[str, Plan] = field(default_factory=dict)
    # requires_grad of every parameter before the first inject, restored by unload
    original_requires_grad: dict[str, bool] = field(default_factory=dict)
    # adapter -> how it was made, for adapters written by peftkit.combine / convert_to_lora (their report)
    reports: dict[str, object] = field(default_factory=dict)
    # torch TransformerEncoders whose use_nested_tensor inject switched off, switched back on by unload
    nested_off: list[nn.Module] = field(default_factory=list)


# what mixed-batch routing keeps on a layer between forwards (core/mixed.py); dropped when an adapter leaves
ROUTED_CACHE_ATTR = "routed_cache"


def is_adapted(model: object) -> bool:
    """Whether adapters were injected into ``model`` itself (not only into a module inside it)."""
    return model is not None and STATE_ATTR in getattr(model, "__dict__", {})


def state_of(model: nn.Module, create: bool = False) -> PeftState:
    state = model.__dict__.get(STATE_ATTR)
    if state is None:
        if not create:
            raise AdapterNameError(
                "this model has no peftkit adapters; call peftkit.inject(model, config) first"
            )
        state = PeftState(original_requires_grad={n: p.requires_grad for n, p in model.named_parameters()})
        model.__dict__[STATE_ATTR] = state
    return state


def require_adapter(
    model: nn.Module, adapter_name: str, error: type[Exception] = AdapterNameError
) -> PeftState:
    """The model's state, after checking it holds ``adapter_name`` (else ``error`` naming those it has)."""
    state = state_of(model)
    if adapter_name not in state.configs:
        raise error(f"no adapter named {adapter_name!r}; adapters on this model: {sorted(state.configs)}")
    return state


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    return [(m.module_name, m) for m in model.modules() if isinstance(m, AdapterLayer)]


def saved_modules(model: nn.Module) -> list[tuple[str, ModulesToSave]]:
    return [(m.module_name, m) for m in model.modules() if isinstance(m, ModulesToSave)]


def model_parts(model: nn.Module) -> dict[str, ModelPart]:
    """Adapter name -> its model-level part, for adapters that have one."""
    return dict(model._modules.get(PARTS_ATTR) or {})


def trained_biases(model: nn.Module, adapted: list[str], which: str) -> list[str]:
    """Names of the base biases an adapter trains with a ``bias`` option: "none", "all", or only those
    of the layers it adapts (any other value, e.g. LoRA's "lora_only"). Biases inside adapter
    modules and full copies are never counted."""
    if which == "none":
        return []
    inside = {
        id(p)
        for m in model.modules()
        if isinstance(m, (AdapterModule, ModulesToSave))
        for p in m.parameters()
    }
    if which == "all":
        owners = list(model.modules())
    else:
        owners = [layer.base_layer for name, layer in adapter_layers(model) if name in adapted]
    wanted = {
        id(m._parameters["bias"]) for m in owners if isinstance(m._parameters.get("bias"), nn.Parameter)
    }
    return [n for n, p in model.named_parameters() if id(p) in wanted - inside]


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _check_new_name(model: nn.Module, adapter_name: str) -> None:
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise AdapterNameError(
            f"adapter name must be a non-empty string without '.', got {adapter_name!r} "
            "('.' would break the saved tensor names)"
        )
    state = model.__dict__.get(STATE_ATTR)
    if state is not None and adapter_name in state.configs:
        raise AdapterNameError(
            f"adapter {adapter_name!r} already exists on this model (adapters: {sorted(state.configs)}); "
            "choose another name, or delete_adapter(model, name) first. The model was not changed."
        )


def inject(
    model: nn.Module,
    config: AdapterConfig,
    adapter_name: str = "default",
    *,
    require_every_entry: bool = True,
) -> nn.Module:
    """Add adapter ``adapter_name`` described by ``config`` to ``model`` in place; make it the active one.

    Everything that can fail (name checks, target resolution, building adapter tensors) happens before
    the model is touched, so a failed call leaves the model as it was.
    """
    _check_new_name(model, adapter_name)
    if config.modules_to_save is None and sequence_head_names(model):
        # A freshly initialised classification head must train in full, or the adapter is useless.
        config = config.replace(modules_to_save=sequence_head_names(model))
        if config.task_type is None:
            config = config.replace(task_type="SEQ_CLS")
    if config.base_model_name_or_path is None:
        source = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(
            model, "name_or_path", None
        )
        if source:
            config = config.replace(base_model_name_or_path=str(source))
    plan = resolve(model, config, require_every_entry=require_every_entry)
    config = config.after_resolve(plan)
    recorded = recorded_targets(plan, config)
    if recorded is not None:
        config = config.replace(target_modules=recorded)
    existing = {m.module_name: m for m in model.modules() if isinstance(m, (AdapterLayer, ModulesToSave))}
    part = config.build_part(model, plan)
    shared = {} if part is None else {"part": part}
    built = []
    by_name: dict[str, AdapterModule] = {}
    for target in plan.targets:
        values = config.layer_values(target) if target.values is None else dict(target.values)
        if target.follows is not None:
            values["follows"] = by_name[target.follows]
        try:
            adapter = target.row.build(target.module, **values, **shared)
        except UnsupportedLayerError as exc:
            raise UnsupportedLayerError(f"{target.name}: {exc}") from None
        _check_compatible(existing.get(target.name), AdapterLayer, target.name, adapter)
        built.append((target, adapter))
        by_name[target.name] = adapter
    tying.refuse_rewritten_ties(model, built)
    for name in plan.modules_to_save:
        _check_compatible(existing.get(name), ModulesToSave, name, None)

    first = STATE_ATTR not in model.__dict__
    state = state_of(model, create=True)
    if first:  # the base is frozen once; later calls leave parameters the user unfroze alone
        for param in model.parameters():
            param.requires_grad_(False)
    for target, adapter in built:
        layer = existing.get(target.name)
        if layer is None:
            layer = AdapterLayer(target.module, target.name).train(target.module.training)
            _set_child(model, target.name, layer)
        # match the layer's train/eval mode: a fresh module is in training mode, which would switch on
        # adapter dropout in a model the user had put in eval mode
        layer.adapters[adapter_name] = adapter.to(_device_of(target.module)).train(target.module.training)
        adapter.attach(target.module)
    for name in plan.modules_to_save:
        wrapper = existing.get(name)
        if wrapper is None:
            saved = model.get_submodule(name)
            wrapper = ModulesToSave(saved, name).train(saved.training)
            _set_child(model, name, wrapper)
        wrapper.add_copy(adapter_name)
    if part is not None:
        if PARTS_ATTR not in model._modules:
            model.add_module(PARTS_ATTR, ModelParts().train(model.training))
        model._modules[PARTS_ATTR][adapter_name] = part.to(_device_of(model)).train(model.training)
        part.attach(model)

    _keep_torch_regular_path(model, state)

    state.configs[adapter_name] = config
    state.plans[adapter_name] = plan
    named = dict(model.named_parameters())
    extra = [named[n] for n in config.extra_trainable(model, [t.name for t in plan.targets])]
    state.extra_trainable[adapter_name] = extra
    # kept to give the base model back unchanged on unload / delete (e.g. biases LoRA trains)
    state.extra_originals[adapter_name] = [p.detach().clone() for p in extra]
    set_active(model, [adapter_name])  # also freezes it when config.inference_mode is set
    pretrained.install(model)  # save_pretrained writes the adapter, not base weights under adapter names
    return model


def _regular_path(module: nn.Module, args: tuple) -> None:
    """A forward pre-hook that does nothing: its presence is what makes torch take the regular path."""


def _keep_torch_regular_path(model: nn.Module, state: PeftState) -> None:
    """Make torch's ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` call the adapted modules.

    In eval mode, with the base frozen (so no weight it reads requires grad), the encoder layer runs one
    fused kernel on its children's weights (``self.linear1.weight``, ``self.self_attn.in_proj_weight`` ...)
    read directly, never calling the children: every adapter and trained copy inside would be skipped, the
    output silently the base model's (the reference library's adapters are skipped there too). torch takes
    the regular path when a forward hook is attached inside the layer, so each wrapper there gets a no-op
    one. The encoder, given a padding mask, would also pack its input into a nested tensor for that fused
    kernel, which the regular path cannot take: its ``use_nested_tensor`` (a speed option, the same
    outputs) is switched off while it holds adapters, and back on by ``unload``.
    """
    for layer in model.modules():
        wrappers = [m for m in layer.modules() if isinstance(m, (AdapterLayer, ModulesToSave))]
        if isinstance(layer, nn.TransformerEncoderLayer):
            for module in wrappers:
                if _regular_path not in module._forward_pre_hooks.values():
                    module.register_forward_pre_hook(_regular_path)
        elif (
            isinstance(layer, nn.TransformerEncoder)
            and wrappers
            and getattr(layer, "use_nested_tensor", False)
        ):
            layer.use_nested_tensor = False
            state.nested_off.append(layer)


def _check_compatible(wrapper: nn.Module | None, wanted: type, name: str, adapter: nn.Module | None) -> None:
    if wrapper is None:
        return
    if not isinstance(wrapper, wanted):
        owners = sorted(getattr(wrapper, "copies", None) or getattr(wrapper, "adapters", {}))
        role = "trained in full (modules_to_save)" if isinstance(wrapper, ModulesToSave) else "adapted"
        raise AdapterNameError(
            f"{name!r} is already {role} by adapter(s) {owners}; one module cannot be both adapted and "
            "trained in full. Drop it from target_modules or modules_to_save. The model was not changed."
        )
    if (
        adapter is not None
        and adapter.rewrites_base
        and any(a.rewrites_base for a in wrapper.adapters.values())
    ):
        raise UnsupportedLayerError(
            f"{name!r} already has an adapter whose init rewrote the base weight (PiSSA/OLoRA); a second "
            "one would decompose the first one's residual. Use another init for the new adapter."
        )


def _device_of(module: nn.Module):
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return None


def trainable_parameters(model: nn.Module, adapter_name: str) -> list[nn.Parameter]:
    """Every parameter adapter ``adapter_name`` trains: its adapter tensors, copies and extra base params."""
    state = state_of(model)
    params = [
        p
        for _, layer in adapter_layers(model)
        if adapter_name in layer.adapters
        for p in layer.adapters[adapter_name].parameters()
    ]
    params += [
        p
        for _, w in saved_modules(model)
        if adapter_name in w.copies
        for p in w.copies[adapter_name].parameters()
    ]
    part = model_parts(model).get(adapter_name)
    params += list(part.parameters()) if part is not None else []
    return params + list(state.extra_trainable.get(adapter_name, []))


def set_active(model: nn.Module, names: list[str]) -> None:
    """Activate ``names`` (their deltas are summed); only active adapters are trainable."""
    state = state_of(model)
    unknown = [n for n in names if n not in state.configs]
    if unknown or not names:
        raise AdapterNameError(
            f"cannot activate {unknown or names!r}; adapters on this model: {sorted(state.configs)}"
        )
    exclusive = [n for n, part in model_parts(model).items() if n in names and part.exclusive]
    if len(exclusive) > 1:
        raise AdapterNameError(
            f"adapters {exclusive} cannot be active together (each rewrites the model's input, e.g. two soft "
            "prompts); activate one of them, possibly beside layer adapters such as LoRA"
        )
    for _, wrapper in saved_modules(model):
        owners = [n for n in names if n in wrapper.copies]
        if len(owners) > 1:
            raise AdapterNameError(
                f"adapters {owners} each have their own copy of {wrapper.module_name!r} (modules_to_save); "
                "only one of them can be active at a time"
            )
    state.active = list(names)
    for _, layer in adapter_layers(model):
        layer.active = [n for n in names if n in layer.adapters]
    for _, wrapper in saved_modules(model):
        wrapper.active = [n for n in names if n in wrapper.copies]
    for name, part in model_parts(model).items():
        part.active = name in names
    for name in state.configs:
        for param in trainable_parameters(model, name):
            param.requires_grad_(False)
    for name in names:
        if not state.configs[name].inference_mode:
            for param in trainable_parameters(model, name):
                param.requires_grad_(True)


def remove_adapter(model: nn.Module, adapter_name: str) -> None:
    state = state_of(model)
    for _, layer in adapter_layers(model):
        if adapter_name in layer.adapters:
            layer.__dict__.pop(ROUTED_CACHE_ATTR, None)
            layer.adapters[adapter_name].detach_from(layer.base_layer)
            layer.adapters[adapter_name].release(layer.base_layer)
            del layer.adapters[adapter_name]
            if not layer.adapters:
                _set_child(model, layer.module_name, layer.base_layer)
    for _, wrapper in saved_modules(model):
        if adapter_name in wrapper.copies:
            del wrapper.copies[adapter_name]
            if not wrapper.copies:
                _set_child(model, wrapper.module_name, wrapper.base_layer)
    _remove_part(model, adapter_name)
    _restore_extra(state, adapter_name)
    for store in (state.configs, state.plans, state.extra_trainable, state.extra_originals, state.reports):
        store.pop(adapter_name, None)
    if adapter_name in state.active:
        state.active.remove(adapter_name)


def _remove_part(model: nn.Module, adapter_name: str) -> None:
    parts = model._modules.get(PARTS_ATTR)
    if parts is not None and adapter_name in parts:
        parts[adapter_name].detach(model)
        del parts[adapter_name]
        if not len(parts):
            del model._modules[PARTS_ATTR]


def _restore_extra(state: PeftState, adapter_name: str) -> None:
    others = {id(p) for n, ps in state.extra_trainable.items() if n != adapter_name for p in ps}
    with torch.no_grad():
        for param, original in zip(
            state.extra_trainable.get(adapter_name, []), state.extra_originals.get(adapter_name, [])
        ):
            if id(param) not in others:  # still trained by another adapter: leave it
                param.copy_(original)


def unload(model: nn.Module, restore_base: bool = True) -> nn.Module:
    """Put every original module back and restore requires_grad; adapters are dropped.

    With ``restore_base`` unmerged adapters undo what they did to the base weight (PiSSA/OLoRA
    residuals); without it the base weights stay as they are (e.g. holding merged adapters).
    """
    state = state_of(model)
    if restore_base:
        with torch.no_grad():
            for name in state.extra_trainable:
                for param, original in zip(state.extra_trainable[name], state.extra_originals[name]):
                    param.copy_(original)
    for _, layer in adapter_layers(model):
        for name, adapter in layer.adapters.items():
            if restore_base and name not in layer.merged:
                adapter.detach_from(layer.base_layer)
            adapter.release(layer.base_layer)
        _set_child(model, layer.module_name, layer.base_layer)
    for _, wrapper in saved_modules(model):
        # when keeping merged adapters, the trained copy of a fully trained module is the result too
        keep = wrapper.current() if not restore_base else wrapper.base_layer
        _set_child(model, wrapper.module_name, keep)
    for name in model_parts(model):
        _remove_part(model, name)
    for name, param in model.named_parameters():
        param.requires_grad_(state.original_requires_grad.get(name, param.requires_grad))
    for encoder in state.nested_off:
        encoder.use_nested_tensor = True
    pretrained.uninstall(model)
    del model.__dict__[STATE_ATTR]
    return model

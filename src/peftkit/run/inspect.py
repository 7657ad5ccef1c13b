"""``peftkit inspect MODEL``: what a model offers to adapt, before choosing a method and targets.

For a model it reports:

* the modules some registered method can adapt, grouped by kind (module class) and by position in the
  repeated blocks (``encoder.layer.N.attention.self.query`` in layers 0-5), with their shapes and
  parameter counts, and which methods can adapt each kind;
* candidate ``target_modules`` values (each module name suffix, ``all-linear``) with the modules and
  base parameters each one selects and the parameters the default method (LoRA, rank 8) would add, as
  its config class prices them (``for_targets``, ``size_label``);
* the classification head a task adds (trained in full beside any adapter, so no target set names it);
* the attention, feed-forward and norm layers found by structure (core/anatomy.py), which defaults
  build on where a method has no table entry for the model_type;
* the targets every registered method picks when ``target_modules`` is left unset, what it adds, and
  where that default came from (the reference library's table, or the structure).

A transformers model is built on the ``meta`` device from its config alone (no weights are read, so
even a large model inspects in seconds); anything else is loaded by its task (``--task`` or a run
config) and then moved to ``meta``. A sentence-transformers directory (``modules.json`` declaring a
pooling) is loaded as ``text-classification`` loads it, since that is the model training would adapt:
its encoder under the pooled classifier, not the masked-LM head its checkpoint was saved with. Parameter
counts come from injecting the real adapter configs into copies of that skeleton, so they are exactly
what training would add.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import api
from ..core import anatomy, moe, registry, targeting
from ..core.config import ALL_LINEAR
from ..core.registry import DEFAULT_METHOD
from ..errors import ConfigError, NoTargetMatchedError

MAX_SHOWN = 6


@dataclass
class ModuleGroup:
    """Modules of one kind at the same place in every repeated block (or one module outside them)."""

    kind: str  # the module class, e.g. "Linear", "Conv2d", "LlamaRMSNorm"
    pattern: str  # the name with the block index as N: "bert.encoder.layer.N.attention.self.query"
    layers: list[int]  # block indices, empty outside the repeated blocks
    shape: str  # "384 -> 1536", "24 -> 144, k1x1" ..., or "5 shapes" when they differ between layers
    params: int  # base parameters of all modules in the group


@dataclass
class TargetSet:
    """A candidate ``target_modules`` value and what it selects."""

    spec: str  # as written in a config: "query", "all-linear"
    modules: int
    base_params: int
    # parameters the default method's config adds on these modules (None: it cannot adapt them); the name
    # is kept from when that was always LoRA, since `peftkit inspect --json` writes it
    lora_params: int | None
    note: str = ""  # why the method cannot adapt them


@dataclass
class MethodDefault:
    """What a method adapts with ``target_modules`` unset."""

    method: str
    targets: list[str]  # patterns of the modules adapted (empty for methods that wrap no layer)
    modules: int
    added_params: int | None  # None when the method cannot be applied with its defaults
    note: str = ""
    source: str = ""  # "reference default for bert", "found by structure: attention query, ..."


@dataclass
class HeadModule:
    """A module of the head a task adds, trained in full beside every adapter (``modules_to_save``)."""

    name: str
    kind: str
    shape: str
    params: int


@dataclass
class ModelInspection:
    """The report of :func:`inspect_model`; ``str()`` is the text ``peftkit inspect`` prints."""

    name: str
    model_class: str
    model_type: str | None
    total_params: int
    loaded_as: str = ""  # how the model was built, when not from its config alone
    head: list[HeadModule] = field(default_factory=list)
    structure: list[str] = field(default_factory=list)  # core/anatomy.py's summary
    experts: list[str] = field(default_factory=list)  # core/moe.py's summary: stacked experts, routers
    groups: list[ModuleGroup] = field(default_factory=list)
    kinds: dict[str, list[str]] = field(default_factory=dict)  # kind -> methods that adapt it
    target_sets: list[TargetSet] = field(default_factory=list)
    defaults: list[MethodDefault] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        lines = [
            f"{self.name}: {self.model_class} (model_type {self.model_type}), {self.total_params:,} parameters"
        ]
        if self.loaded_as:
            lines.append(f"  loaded as {self.loaded_as}")
        lines += ["", "adaptable modules by kind and layer:"]
        for kind in self.kinds:
            groups = [g for g in self.groups if g.kind == kind]
            count = sum(max(1, len(g.layers)) for g in groups)
            lines.append(
                f"  {kind}: {count} modules, {sum(g.params for g in groups):,} params "
                f"(methods: {', '.join(self.kinds[kind])})"
            )
            for g in groups:
                lines.append(
                    f"    {g.pattern:<52} {_layer_range(g.layers):<13} {g.shape:<24} {g.params:>11,}"
                )
        priced = _priced_config(ALL_LINEAR)
        method = priced.display_name or priced.peft_type
        lines += ["", f"candidate target_modules ({priced.size_label()} adds):"]
        lines.append(f"  {'target_modules':<40} {'modules':>7} {'base params':>13} {method + ' params':>12}")
        for t in self.target_sets:
            lora = f"{t.lora_params:>12,}" if t.lora_params is not None else f"{'-':>12}"
            lora += f"  ({t.note})" if t.note else ""
            lines.append(f"  {t.spec:<40} {t.modules:>7} {t.base_params:>13,} {lora}")
        if self.head:
            lines += ["", "head the task adds (trained in full beside any adapter: modules_to_save):"]
            lines += [f"  {h.name:<40} {h.kind:<24} {h.shape:<16} {h.params:>11,}" for h in self.head]
        lines += [
            "",
            "found by structure (what defaults use where a method has no entry for this model_type):",
        ]
        lines += [f"  {line}" for line in self.structure]
        if self.experts:
            lines += ["", "mixture of experts held as parameters (no linear layer holds them; docs/moe.md):"]
            lines += [f"  {line}" for line in self.experts]
            lines.append(
                "  all-linear adapts these expert weights and routers too (LoRA, as target_parameters); "
                "modules_to_save=[<router>] trains a router in full instead"
            )
        lines += ["", "default targets of each method (target_modules unset):"]
        for d in self.defaults:
            added = "-" if d.added_params is None else f"+{d.added_params:,} params"
            where = ", ".join(d.targets[:MAX_SHOWN]) + (
                f", ... ({len(d.targets)} patterns)" if len(d.targets) > MAX_SHOWN else ""
            )
            lines.append(
                f"  {d.method:<14} {added:<18} {f'{d.modules} modules: {where}' if d.targets else d.note}"
            )
            if d.source:
                lines.append(f"  {'':<14} {'':<18} ({d.source})")
        return "\n".join(lines)


def inspect_model(name_or_path: str, *, task: str | None = None, config: Any = None) -> ModelInspection:
    """Inspect a model: adaptable modules, candidate target sets, each method's default targets.

    Args:
        name_or_path: A bundled model name, a local transformers model directory or a hub id.
        task: Load the model the way this registered task does (needed for models that are not
            transformers directories, e.g. the bundled EfficientNet-Lite0).
        config: A :class:`~peftkit.run.schema.RunConfig`: load its model through its task (takes
            precedence over ``name_or_path`` and ``task``).

    Raises:
        ConfigError: the model is not a transformers directory and no task was given.
        OSError: the model cannot be found.
    """
    model, loaded_as = _skeleton(name_or_path, task, config)
    name = config.model.name_or_path if config is not None else name_or_path
    report = ModelInspection(
        name=name,
        model_class=type(model).__name__,
        model_type=getattr(getattr(model, "config", None), "model_type", None),
        total_params=sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
        loaded_as=loaded_as,
    )
    adaptable = _adaptable(model)
    report.groups = _groups(adaptable)
    for _, module, methods in adaptable:
        known = report.kinds.setdefault(type(module).__name__, [])
        known += [m for m in methods if m not in known]
    heads = targeting.sequence_head_names(model)
    report.head = _head(model, heads)
    report.structure = anatomy.find(model).summary()
    report.experts = moe.summary(moe.find(model))
    report.target_sets = _target_sets(model, [a for a in adaptable if not _under(a[0], heads)])
    report.defaults = [_method_default(model, peft_type) for peft_type in registry.registered_methods()]
    return report


# -- loading ---------------------------------------------------------------------------------------


def _skeleton(name_or_path: str, task: str | None, config: Any) -> tuple[nn.Module, str]:
    """The model's modules on the ``meta`` device (shapes and types, no weights), and how it was built
    when not from its config alone."""
    if config is None and task is None:
        from ..models import bundled_model_path, source_problem

        problem = source_problem(name_or_path)
        if problem and not Path(name_or_path).expanduser().exists():
            raise ConfigError([f"model: {problem.rstrip('; ')}"], what="inspect")
        path = bundled_model_path(name_or_path) or name_or_path
        if Path(path).is_file() or (
            Path(path).is_dir()
            and not (Path(path) / "config.json").is_file()
            and not list(Path(path).glob("*.gguf"))
        ):
            from ..tasks import registered_tasks

            raise ConfigError(
                [
                    f"model {name_or_path!r} ({path}) is not a transformers model directory; pass --task TASK to load "
                    f"it the way that task does (tasks: {', '.join(registered_tasks())}), or give a run config"
                ],
                what="inspect",
            )
        declared = _declared_pooling(path)
        if declared is None:
            return _transformers_skeleton(path), ""
        task = "text-classification"
        why = f"task {task}, as a sentence-transformers model ({declared[1]} declares {declared[0]} pooling)"
    else:
        why = f"task {config.task if config is not None else task}"
    from ..models.config import ModelConfig
    from .runner import build_task
    from .schema import RunConfig

    if config is None:  # a placeholder 2-class head: the head's size is the task's business
        config = RunConfig(task=task, model=ModelConfig(name_or_path=name_or_path, num_labels=2))
    model = build_task(config).load_model()
    return model.to("meta"), why


def _declared_pooling(path: str) -> tuple[str, str] | None:
    """The pooling a local sentence-transformers directory declares (a hub id is not asked: offline,
    that would wait on the network)."""
    if not Path(path).is_dir():
        return None
    from ..tasks.pooling import declared_pooling

    return declared_pooling(path)


def _transformers_skeleton(path: str) -> nn.Module:
    import transformers

    gguf = sorted(Path(path).glob("*.gguf")) if Path(path).is_dir() else []
    kwargs = {"gguf_file": gguf[0].name} if gguf and not (Path(path) / "config.json").is_file() else {}
    model_config = transformers.AutoConfig.from_pretrained(path, **kwargs)
    architectures = getattr(model_config, "architectures", None) or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    with torch.device("meta"):
        if cls is not None:
            return cls(model_config)
        return transformers.AutoModel.from_config(model_config)


# -- modules ---------------------------------------------------------------------------------------


def _adaptable(model: nn.Module) -> list[tuple[str, nn.Module, list[str]]]:
    """``(name, module, methods that can adapt it)`` for every module some method can adapt."""
    methods = [m for m in registry.registered_methods() if registry.method(m).rows]
    # read by its attention module, never called: targeting refuses it
    unreachable = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    out = []
    for name, module in targeting.user_modules(model):
        if not name or id(module) in unreachable:
            continue
        able = [m.lower() for m in methods if registry.dispatch(m, module)[0] is not None]
        if able:
            out.append((name, module, able))
    return out


def _split_layer(name: str) -> tuple[str, int | None]:
    """``("encoder.layer.N.attention.self.query", 3)``: the name with its first index as N."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit() and i > 0:
            return ".".join(parts[:i] + ["N"] + parts[i + 1 :]), int(part)
    return name, None


def _shape(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return f"{module.in_features} -> {module.out_features}"
    if isinstance(module, nn.Embedding):
        return f"{module.num_embeddings} x {module.embedding_dim}"
    if isinstance(module, nn.modules.conv._ConvNd):
        return f"{module.in_channels} -> {module.out_channels}, k{'x'.join(map(str, module.kernel_size))}" + (
            f", groups {module.groups}" if module.groups > 1 else ""
        )
    if isinstance(module, nn.MultiheadAttention):
        return f"{module.embed_dim}, {module.num_heads} heads"
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() <= 2:
        return "x".join(map(str, weight.shape))
    return "block"


def _own_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _groups(adaptable: list[tuple[str, nn.Module, list[str]]]) -> list[ModuleGroup]:
    groups: dict[tuple[str, str], ModuleGroup] = {}
    shapes: dict[tuple[str, str], list[str]] = {}
    for name, module, _ in adaptable:
        pattern, layer = _split_layer(name)
        key = (type(module).__name__, pattern)
        group = groups.setdefault(key, ModuleGroup(key[0], pattern, [], "", 0))
        if layer is not None:
            group.layers.append(layer)
        group.params += _own_params(module)
        seen = shapes.setdefault(key, [])
        if _shape(module) not in seen:
            seen.append(_shape(module))
    for key, group in groups.items():
        group.shape = shapes[key][0] if len(shapes[key]) == 1 else f"{len(shapes[key])} shapes"
    return list(groups.values())


def _under(name: str, roots: list[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def _head(model: nn.Module, heads: list[str]) -> list[HeadModule]:
    """The modules of the fresh classification head (whole head first, then its layers)."""
    out = []
    for name, module in targeting.user_modules(model):
        if _under(name, heads) and (name in heads or _shape(module) != "block"):
            out.append(HeadModule(name, type(module).__name__, _shape(module), _own_params(module)))
    return out


def _layer_range(layers: list[int]) -> str:
    if not layers:
        return ""
    unique = sorted(set(layers))
    if unique == list(range(unique[0], unique[-1] + 1)):
        return f"layers {unique[0]}-{unique[-1]}" if len(unique) > 1 else f"layer {unique[0]}"
    return f"{len(unique)} layers"


# -- candidate target sets -------------------------------------------------------------------------


def _priced_config(spec: list[str] | str) -> Any:
    """The config candidate target sets are priced with: the default method's own, on ``spec``."""
    return registry.find_method(DEFAULT_METHOD).config_cls.for_targets(spec)


def _target_sets(model: nn.Module, adaptable: list[tuple[str, nn.Module, list[str]]]) -> list[TargetSet]:
    """Each module-name suffix the default method can adapt (its last one or two name parts), and
    ``all-linear``."""
    priced = registry.find_method(DEFAULT_METHOD).peft_type.lower()
    able = [(name, module) for name, module, methods in adaptable if priced in methods]
    specs: list[str] = []
    for name, _ in able:
        parts = [p for p in _split_layer(name)[0].split(".") if p != "N"]
        for size in (1, 2):
            suffix = ".".join(parts[-size:])
            if len(parts) >= size and suffix not in specs:
                specs.append(suffix)
    sets: list[TargetSet] = []
    for spec in specs:
        chosen = [(n, m) for n, m in able if targeting.name_matches([spec], n)]
        if not chosen or any(s.modules == len(chosen) and spec.endswith("." + s.spec) for s in sets):
            continue  # "self.query" selects exactly what "query" does: show the shorter one only
        sets.append(_priced(model, spec, [spec], chosen))
    heads = targeting.output_head_names(model)  # a task's fresh head is already left out of `adaptable`
    # all-linear also takes nn.MultiheadAttention modules whole where the method adapts them
    linear_kinds = (*targeting.LINEAR_TYPES, nn.MultiheadAttention)
    linear = [(n, m) for n, m in able if isinstance(m, linear_kinds) and n not in heads]
    if linear:
        sets.append(_priced(model, ALL_LINEAR, ALL_LINEAR, linear))
        held = _expert_parameters(model)
        if held and sets[-1].lora_params is not None:  # all-linear took them too
            sets[-1].modules += len(held)
            sets[-1].base_params += sum(held.values())
            sets[-1].note = f"incl. {len(held)} expert weights and routers held as parameters"
    return sets


def _expert_parameters(model: nn.Module) -> dict[str, int]:
    """Stacked expert weights and non-linear routers' weights (what all-linear adds), with their sizes."""
    modules = dict(anatomy.user_modules(model))
    sizes = {}
    for block in moe.find(model):
        names = [w.name for w in block.weights]
        if block.router_weight and not block.router_linear:
            names.append(block.router_weight)
        for name in names:
            owner, _, pname = name.rpartition(".")
            sizes[name] = getattr(modules[owner], pname).numel()
    return sizes


def _priced(
    model: nn.Module, label: str, spec: list[str] | str, chosen: list[tuple[str, nn.Module]]
) -> TargetSet:
    """The target set with the parameters the default method adds on it (injected into a copy)."""
    base = sum(_own_params(m) for _, m in chosen)
    try:
        probe = api.inject(copy.deepcopy(model), _priced_config(spec))
    except Exception as exc:  # noqa: BLE001 - the reason the method cannot take these modules is the answer
        return TargetSet(label, len(chosen), base, None, _first_sentence(str(exc)))
    added = sum(count for *_, count in api.trainable_summary(probe, show=False).adapted)
    return TargetSet(label, len(chosen), base, added)


# -- each method's defaults ------------------------------------------------------------------------


def _method_default(model: nn.Module, peft_type: str) -> MethodDefault:
    """What ``peft_type`` adapts with its default config (``target_modules`` unset)."""
    method = peft_type.lower()
    try:
        config = registry.config_class(peft_type)()
        probe = copy.deepcopy(model)
        plan = None
        if config.wraps_layers:  # as inject sees it: a task's fresh head is trained in full, not adapted
            heads = targeting.sequence_head_names(probe)
            plan = targeting.resolve(probe, config.replace(modules_to_save=heads) if heads else config)
        api.inject(probe, config)
        summary = api.trainable_summary(probe, show=False)
    except ConfigError as exc:  # a field without a default, e.g. num_virtual_tokens
        return MethodDefault(method, [], 0, None, "needs " + "; ".join(exc.problems))
    except Exception as exc:  # noqa: BLE001 - the reason is the report
        if isinstance(exc, NoTargetMatchedError) and "has no default" in str(exc):
            why = re.search(r"; (no .*? found by structure.*?); set target_modules", str(exc), re.S)
            return MethodDefault(
                method, [], 0, None, f"no default: {why.group(1) if why else 'set target_modules'}"
            )
        return MethodDefault(method, [], 0, None, _first_sentence(str(exc)))
    added = sum(count for *_, count in summary.adapted)
    if plan is None:
        return MethodDefault(method, [], 0, added, "wraps no layer (virtual tokens / whole-model part)")
    patterns = list(dict.fromkeys(_split_layer(t.name)[0] for t in plan.targets))
    return MethodDefault(
        method, patterns, len(plan.targets), added, source=plan.default.source if plan.default else ""
    )


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    match = re.match(r"(.{20,200}?[.;])\s", text + " ")
    return match.group(1) if match else text[:200]

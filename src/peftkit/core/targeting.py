"""Which modules of a model an adapter config picks, and why others were not picked.

Matching follows the reference library so that a saved config selects the same modules in both:
a list entry matches a full module name or a ``"." + entry`` suffix, a string is a full-match regex,
``"all-linear"`` means every linear layer but the output head.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from ..errors import NoTargetMatchedError, UnsupportedLayerError
from . import registry
from .config import ALL_LINEAR, AdapterConfig
from .layer import AdapterLayer, ModelParts, ModulesToSave

try:  # GPT-2 style linear layer with a transposed weight
    from transformers.pytorch_utils import Conv1D as HFConv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but keep the core importable
    HFConv1D = ()

LINEAR_TYPES: tuple[type, ...] = (nn.Linear,) + ((HFConv1D,) if HFConv1D else ())


@dataclass
class Target:
    name: str
    module: nn.Module  # the base module (for an already adapted layer: its base_layer)
    row: registry.LayerRow
    rank: float | None = None  # per-module override from rank_pattern
    alpha: float | None = None  # per-module override from alpha_pattern


@dataclass
class Plan:
    targets: list[Target] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (name, type, reason)
    modules_to_save: list[str] = field(default_factory=list)
    # the model's config.model_type (None for plain modules), for methods with per-architecture defaults
    model_type: str | None = None


def user_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named modules as the user sees them: an adapted layer stands for the base layer it wraps."""
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        name, module = stack.pop()
        if isinstance(module, (AdapterLayer, ModulesToSave)):
            yield name, module.base_layer
            continue
        if isinstance(module, ModelParts):  # adapter state, not part of the user's model
            continue
        yield name, module
        children = list(module.named_children())
        for child_name, child in reversed(children):
            stack.append((f"{name}.{child_name}" if name else child_name, child))


def name_matches(spec: list[str] | str, name: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    """Index of the repeated block a module lives in (the first number after the pattern)."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else (layers_pattern or [])
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match:
                break
    return int(match.group("idx")) if match else None


def pattern_value(pattern: dict[str, float], name: str) -> float | None:
    """The value whose key matches the end of ``name`` (reference semantics: ``(.*\\.)?key$``)."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


def output_head_names(model: nn.Module) -> set[str]:
    """The module(s) producing the model's final logits, which "all-linear" leaves alone."""
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    for name, module in user_modules(model):
        if head is not None and module is head:
            heads.add(name)
    return heads


def sequence_head_names(model: nn.Module) -> list[str]:
    """Classification heads that are freshly initialised when a model is loaded for a new task."""
    cls_name = type(model).__name__
    if not cls_name.endswith(("ForSequenceClassification", "ForTokenClassification")):
        return []
    return [n for n in ("classifier", "score") if isinstance(getattr(model, n, None), nn.Module)]


def resolve(model: nn.Module, config: AdapterConfig, require_every_entry: bool = True) -> Plan:
    """Work out which modules ``config`` adapts on ``model``; raise if the answer is surely a mistake."""
    peft_type = config.peft_type
    targets_spec = config.target_modules
    if targets_spec is None and config.wraps_layers:
        targets_spec = default_targets(model, config)

    plan = Plan(model_type=getattr(getattr(model, "config", None), "model_type", None))
    save_specs = list(config.modules_to_save or [])
    names = [n for n, _ in user_modules(model) if n]
    # The reference library matches modules_to_save by a plain suffix (so "classifier" also takes
    # DistilBERT's "pre_classifier"); the same rule keeps saved adapters interchangeable.
    plan.modules_to_save = [n for n in names if any(n.endswith(s) for s in save_specs)]
    unmatched_saves = [s for s in save_specs if not any(n.endswith(s) for n in plan.modules_to_save)]
    if unmatched_saves and (require_every_entry or not plan.modules_to_save):
        raise NoTargetMatchedError(
            "modules_to_save: " + _no_match_message(unmatched_saves, names, config)
        )
    if not config.wraps_layers:
        return plan
    saved_prefixes = tuple(n + "." for n in plan.modules_to_save)
    heads = output_head_names(model) if targets_spec == ALL_LINEAR else set()

    hit_entries: set[str] = set()
    explicit_unsupported: list[str] = []
    # nn.MultiheadAttention reads out_proj.weight directly instead of calling out_proj: a wrapper
    # there would be silently bypassed.
    bypassed = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    seen: dict[int, str] = {}
    for name, module in user_modules(model):
        if not name or name in plan.modules_to_save or name.startswith(saved_prefixes):
            continue
        if not _selected(name, module, config, targets_spec, heads):
            continue
        if isinstance(targets_spec, list):
            hit_entries.update(s for s in targets_spec if name == s or name.endswith("." + s))
        if id(module) in seen:
            raise UnsupportedLayerError(
                f"{name!r} is the same module object as {seen[id(module)]!r} (shared or tied weights); "
                "adapting it at one path would leave the other unadapted. Exclude one of the two names."
            )
        seen[id(module)] = name
        if id(module) in bypassed:
            row, reason = None, "out_proj of nn.MultiheadAttention, which reads its weight without calling it"
        else:
            row, reason = registry.dispatch(peft_type, module)
        if row is None:
            plan.skipped.append((name, type(module).__name__, reason or "unsupported"))
            if isinstance(targets_spec, list):
                explicit_unsupported.append(f"{name} ({type(module).__name__}: {reason})")
            continue
        plan.targets.append(
            Target(name, module, row, pattern_value(config.rank_pattern, name), pattern_value(config.alpha_pattern, name))
        )

    _refuse_mistakes(plan, config, targets_spec, hit_entries, explicit_unsupported, names, require_every_entry)
    return plan


def _selected(name: str, module: nn.Module, config: AdapterConfig, targets_spec: list[str] | str, heads: set[str]) -> bool:
    """Whether the target spec, exclude_modules and the layer filter all pick module ``name``."""
    if config.exclude_modules and name_matches(config.exclude_modules, name):
        return False
    if targets_spec == ALL_LINEAR:
        if not isinstance(module, LINEAR_TYPES) or name in heads:
            return False
    elif not name_matches(targets_spec, name):
        return False
    wanted = config.layers_to_transform
    wanted = [wanted] if isinstance(wanted, int) else wanted
    exact = isinstance(targets_spec, list) and name in targets_spec  # full names skip the layer filter
    return not (wanted and not exact and layer_index(name, config.layers_pattern) not in wanted)


def _refuse_mistakes(
    plan: Plan,
    config: AdapterConfig,
    targets_spec: list[str] | str,
    hit_entries: set[str],
    explicit_unsupported: list[str],
    names: list[str],
    require_every_entry: bool,
) -> None:
    """Raise when the selection is surely not what the user meant: an entry matching nothing, a
    named module that cannot be adapted, or nothing adaptable at all."""
    peft_type = config.peft_type
    if isinstance(targets_spec, list):
        missing = [s for s in targets_spec if s not in hit_entries]
        if missing and (require_every_entry or not hit_entries):
            raise NoTargetMatchedError(_no_match_message(missing, names, config))
    elif not plan.targets and not plan.skipped:
        raise NoTargetMatchedError(_no_match_message([targets_spec], names, config))
    if explicit_unsupported:
        raise UnsupportedLayerError(
            f"{peft_type} cannot adapt {len(explicit_unsupported)} module(s) named in target_modules: "
            + "; ".join(explicit_unsupported[:5])
            + f". Supported layer types: {registry.supported_kinds(peft_type)}. "
            "Remove these names from target_modules or point it at the layers inside them."
        )
    if not plan.targets:
        raise UnsupportedLayerError(
            f"{peft_type}: every module matched by {targets_spec!r} is unsupported "
            f"({', '.join(f'{n} ({t})' for n, t, _ in plan.skipped[:5])}). "
            f"Supported layer types: {registry.supported_kinds(peft_type)}."
        )


def default_targets(model: nn.Module, config: AdapterConfig) -> list[str] | str:
    spec = config.default_target_spec(model)
    if spec is not None:  # a default worked out from the model itself, whatever its architecture
        return spec
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    defaults: dict[str, list[str] | str] = getattr(config, "default_targets", {})
    if model_type in defaults:
        spec = defaults[model_type]
        return spec if isinstance(spec, str) else list(spec)
    raise NoTargetMatchedError(
        f"target_modules is None and {config.peft_type} has no default for model_type={model_type!r} "
        f"(defaults exist for {sorted(defaults) or 'no model type'}); set target_modules, e.g. to "
        f"'{ALL_LINEAR}' or a list of module names such as {_example_linear_names(model)}"
    )


def _example_linear_names(model: nn.Module) -> list[str]:
    suffixes: list[str] = []
    for name, module in user_modules(model):
        last = name.rsplit(".", 1)[-1]
        if isinstance(module, LINEAR_TYPES) and last not in suffixes:
            suffixes.append(last)
    return suffixes[:6]


def _no_match_message(missing: list[str], names: list[str], config: AdapterConfig) -> str:
    # Suggest what a user would write: the shortest suffix naming a module ("query"), each once, rather
    # than one full path per layer (the same name six times over).
    suffixes: set[str] = set()
    for full in names:
        parts = full.split(".")
        suffixes.update(".".join(parts[i:]) for i in range(len(parts)))
    lines = []
    for entry in missing:
        pool = sorted(suffixes) if "." in entry else sorted({n.rsplit(".", 1)[-1] for n in names})
        close = difflib.get_close_matches(entry, pool, n=3, cutoff=0.5)
        hint = ", ".join(f"'{c}'" for c in close) if close else "none similar"
        lines.append(f"target {entry!r} matched 0 modules; closest: {hint}")
    extra = ""
    if config.layers_to_transform is not None or config.exclude_modules:
        extra = " (after exclude_modules / layers_to_transform filtering)"
    return "; ".join(lines) + extra + f". The model has {len(names)} modules; list them with model.named_modules()."

"""Which modules of a model an adapter config picks, and why others were not picked.

Matching follows the reference library so that a saved config selects the same modules in both:
a list entry matches a full module name or a ``"." + entry`` suffix, a string is a full-match regex,
``"all-linear"`` means every linear layer but the output head.
"""

from __future__ import annotations

import difflib
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import NoTargetMatchedError, UnsupportedLayerError
from . import anatomy, moe, registry
from .anatomy import LINEAR_TYPES, HFConv1D, user_modules  # noqa: F401 - HFConv1D: methods import it from here
from .config import ALL_LINEAR, AdapterConfig


@dataclass
class ParameterTarget:
    """One ``nn.Parameter`` adapted directly (``target_parameters``, or ``all-linear`` on stacked experts)."""

    name: str  # its name on the module, "gate_up_proj"
    full_name: str  # "model.layers.0.mlp.experts.gate_up_proj"
    shape: tuple[int, ...]
    rank: float | None = None  # override from rank_pattern, matched against full_name
    alpha: float | None = None
    # linear maps fused in it, as all-linear counts them: 2 for a fused gate-and-up expert weight, which
    # then gets twice the rank and alpha (the reference library's convention, so both build one adapter)
    maps: int = 1


@dataclass
class Target:
    name: str
    module: nn.Module  # the base module (for an already adapted layer: its base_layer)
    row: registry.LayerRow | registry.ParameterRow
    rank: float | None = None  # per-module override from rank_pattern
    alpha: float | None = None  # per-module override from alpha_pattern
    # for a parameter target (row is a ParameterRow): the module's adapted parameters, in registration order
    parameters: dict[str, ParameterTarget] = field(default_factory=dict)
    # a target added by the config's ``extra_targets`` hook: the builder's plain values (instead of
    # ``config.layer_values(target)``), and the earlier target whose adapter this one's shares tensors with
    # (a module holding the same weight: tied embeddings); its builder gets that adapter as ``follows=``
    values: dict[str, Any] | None = None
    follows: str | None = None


@dataclass
class AllLinearParameters:
    """What ``all-linear`` added beyond linear layers (stacked experts and routers on a mixture-of-experts
    model, whole ``nn.MultiheadAttention`` modules), as a config records it: explicit lists the reference
    library reads the same way (it does not expand all-linear like this on every architecture, so a
    recorded ``"all-linear"`` would not be enough)."""

    target_modules: list[str] | str  # the linear modules chosen
    target_parameters: list[str]  # the stacked expert weights and router weights chosen
    # rank_pattern / alpha_pattern key -> maps, for fused weights whose rank no pattern set
    fused_rank: dict[str, int] = field(default_factory=dict)
    fused_alpha: dict[str, int] = field(default_factory=dict)


@dataclass
class Plan:
    targets: list[Target] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (name, type, reason)
    modules_to_save: list[str] = field(default_factory=list)
    # the model's config.model_type (None for plain modules), for methods with per-architecture defaults
    model_type: str | None = None
    # what target_modules=None stood for, and why (None when target_modules was given)
    default: DefaultTargets | None = None
    # set when all-linear also chose parameters (stacked experts, routers): what the config records
    all_linear: AllLinearParameters | None = None


@dataclass
class DefaultTargets:
    """What ``target_modules=None`` selects on one model, and where that choice came from."""

    spec: list[str] | str
    source: str  # "reference default for bert", "found by structure: attention query, value", ...
    kind: str  # "rule" (the method's own, e.g. BitFit's biases), "table" or "structure"
    # by structure: role -> the part of ``spec`` selecting that role's modules (IA3 reads "mlp_down")
    parts: dict[str, list[str] | str] = field(default_factory=dict)

    @property
    def by_structure(self) -> bool:
        return self.kind == "structure"


def recorded_targets(plan: Plan, config: AdapterConfig) -> list[str] | str | None:
    """What a config saved after ``plan`` records as ``target_modules`` when it was left unset: the
    default it stood for, as the reference library records its own (a default found by structure is in
    no table a reader could consult). A regex default beside ``layers_to_transform``, a combination the
    reference refuses, is recorded as the full names chosen. None: keep it unset (a method's own rule)."""
    if config.target_modules is not None or plan.default is None or plan.default.kind == "rule":
        return None
    if isinstance(plan.default.spec, str) and config.layers_to_transform not in (None, []):
        return [t.name for t in plan.targets]
    return plan.default.spec


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
    parameter_spec = config.parameter_targets() or []
    plan = Plan(model_type=getattr(getattr(model, "config", None), "model_type", None))
    if targets_spec is None and config.wraps_layers:
        plan.default = default_targets(model, config, structure=not parameter_spec) or DefaultTargets(
            [], "none beside target_parameters (no table entry for this model_type)", "table"
        )
        targets_spec = plan.default.spec
    save_specs = list(config.modules_to_save or [])
    names = [n for n, _ in user_modules(model) if n]
    # The reference library matches modules_to_save by a plain suffix (so "classifier" also takes
    # DistilBERT's "pre_classifier"); the same rule keeps saved adapters interchangeable.
    plan.modules_to_save = [n for n in names if any(n.endswith(s) for s in save_specs)]
    unmatched_saves = [s for s in save_specs if not any(n.endswith(s) for n in plan.modules_to_save)]
    if unmatched_saves and (require_every_entry or not plan.modules_to_save):
        raise NoTargetMatchedError("modules_to_save: " + _no_match_message(unmatched_saves, names, config))
    if not config.wraps_layers:
        return plan
    saved_prefixes = tuple(n + "." for n in plan.modules_to_save)
    heads = output_head_names(model) if targets_spec == ALL_LINEAR else set()

    hit_entries: set[str] = set()
    explicit_unsupported: list[str] = []
    # nn.MultiheadAttention reads out_proj.weight directly instead of calling out_proj: a wrapper
    # there would be silently bypassed. A method adapting the attention module itself covers it there.
    bypassed = {id(m.out_proj): n for n, m in user_modules(model) if isinstance(m, nn.MultiheadAttention)}
    covered: set[int] = set()  # out_proj of an attention module adapted as a whole
    seen: dict[int, str] = {}
    for name, module in user_modules(model):
        if not name or name in plan.modules_to_save or name.startswith(saved_prefixes):
            if name in plan.modules_to_save and isinstance(targets_spec, list):
                # named in both: trained in full and not adapted, as the reference library does (its
                # custom-model matrix has such cases), so the entry is not a name matching nothing
                hit_entries.update(s for s in targets_spec if name == s or name.endswith("." + s))
            continue
        if not _selected(name, module, config, targets_spec, heads):
            continue
        if isinstance(targets_spec, list):
            hit_entries.update(s for s in targets_spec if name == s or name.endswith("." + s))
        if id(module) in covered:
            continue  # adapted with its attention module
        if id(module) in seen:
            raise UnsupportedLayerError(
                f"{name!r} is the same module object as {seen[id(module)]!r} (shared or tied weights); "
                "adapting it at one path would leave the other unadapted. Exclude one of the two names."
            )
        seen[id(module)] = name
        if id(module) in bypassed:
            row, reason = None, _bypassed_reason(model, peft_type, bypassed[id(module)])
        else:
            row, reason = registry.dispatch(peft_type, module)
        if row is not None and isinstance(module, nn.MultiheadAttention):
            covered.add(id(module.out_proj))
        if row is None:
            plan.skipped.append((name, type(module).__name__, reason or "unsupported"))
            if isinstance(targets_spec, list):
                explicit_unsupported.append(f"{name} ({type(module).__name__}: {reason})")
            continue
        plan.targets.append(
            Target(
                name,
                module,
                row,
                pattern_value(config.rank_pattern, name),
                pattern_value(config.alpha_pattern, name),
            )
        )

    if parameter_spec or targets_spec == ALL_LINEAR:
        _resolve_parameters(
            model, config, plan, parameter_spec, targets_spec == ALL_LINEAR, require_every_entry
        )
    if targets_spec == ALL_LINEAR and plan.all_linear is None and covered:
        # The reference's all-linear wraps each out_proj as a linear layer (which the attention module
        # never calls) instead of the attention module: recorded as the explicit names chosen, which the
        # reference reads as this adapter.
        chosen = [t.name for t in plan.targets]
        plan.all_linear = AllLinearParameters(anatomy.target_spec(names, [chosen])[0], [])
    _refuse_mistakes(
        plan, config, targets_spec, hit_entries, explicit_unsupported, names, require_every_entry
    )
    _add_extra_targets(model, config, plan)
    return plan


def _add_extra_targets(model: nn.Module, config: AdapterConfig, plan: Plan) -> None:
    """Append the targets the config adds beyond its target_modules (``extra_targets``: LoRA's
    ``trainable_token_indices``, the tied output head of trainable tokens); one module cannot take two."""
    extra = config.extra_targets(model, plan)
    taken = {t.name: "adapted by target_modules" for t in plan.targets}
    taken.update(dict.fromkeys(plan.modules_to_save, "trained in full (modules_to_save)"))
    for target in extra:
        if target.name in taken:
            raise UnsupportedLayerError(
                f"{target.name!r} is {taken[target.name]} and also a target of {config.peft_type}'s "
                f"{target.row.kind}; one module takes one adapter per name. Drop it from one of the two."
            )
        taken[target.name] = f"a target of {target.row.kind}"
    plan.targets += extra


# -- parameters adapted directly (target_parameters; all-linear on stacked experts) -----------------


def _moe_parameters(
    model: nn.Module, config: AdapterConfig, plan: Plan, saved: tuple[str, ...]
) -> dict[str, int]:
    """What all-linear adds on a mixture-of-experts model: full parameter name -> linear maps in it.

    Stacked expert weights and routers' scoring weights are linear maps held as parameters; all-linear
    takes them as the reference library does on the MoE architectures transformers 5 fused (Qwen3-MoE,
    Mixtral, OLMoE ...), and on any other model where core/moe.py finds them. Experts or routers in
    modules_to_save are trained in full instead; exclude_modules leaves them out. Everything else found is
    reported, never dropped silently."""
    wanted: dict[str, int] = {}
    able = registry.adapts_parameters(config.peft_type)
    for block in moe.find(model):
        parts = [(w.name, block.experts, w.maps) for w in block.weights]
        if block.router_weight and not block.router_linear:  # a linear router is a module target already
            parts.append((block.router_weight, block.router, 1))
        for full, owner, maps in parts:
            if owner in plan.modules_to_save or owner.startswith(saved):
                continue
            if config.exclude_modules and (
                name_matches(config.exclude_modules, owner) or name_matches(config.exclude_modules, full)
            ):
                continue
            if able:
                wanted[full] = maps
            else:
                plan.skipped.append(
                    (
                        full,
                        "expert weights" if owner == block.experts else "router weight",
                        f"{config.peft_type} adapts modules only; all-linear cannot reach weights held as parameters",
                    )
                )
        for full, shape in block.others:
            plan.skipped.append(
                (
                    full,
                    f"per-expert tensor {shape}",
                    "all-linear adapts the experts' weights; this one stays frozen",
                )
            )
    return wanted


def _resolve_parameters(
    model: nn.Module,
    config: AdapterConfig,
    plan: Plan,
    spec: list[str],
    all_linear: bool,
    require_every_entry: bool,
) -> None:
    """Add a target per module owning parameters that ``spec`` (the reference library's rule: a full
    parameter name or a ``.``-suffix of one) or all-linear's expansion picks. As in the reference,
    ``exclude_modules`` and ``layers_to_transform`` do not filter named parameters (a warning says when
    they would have); modules_to_save modules are trained in full instead (reported as skipped)."""
    saved = tuple(n + "." for n in plan.modules_to_save)
    wanted = _moe_parameters(model, config, plan, saved) if all_linear else {}
    module_targets = {t.name for t in plan.targets}
    by_module: dict[str, Target] = {}
    hit: set[str] = set()
    seen: dict[int, str] = {}
    unsupported, unfiltered, names = [], [], []
    for module_name, module in user_modules(model):
        for pname, param in module._parameters.items():
            if param is None:
                continue
            full = f"{module_name}.{pname}" if module_name else pname
            names.append(full)
            hits = [s for s in spec if full == s or full.endswith("." + s)]
            if not hits and full not in wanted:
                continue
            hit.update(hits)
            shape = tuple(param.shape)
            if module_name in plan.modules_to_save or module_name.startswith(saved):
                plan.skipped.append(
                    (full, f"Parameter{shape}", "its module is trained in full (modules_to_save)")
                )
                continue
            _check_parameter_owner(full, module_name, module_targets, seen.get(id(param)))
            seen[id(param)] = full
            if hits and _filtered_out(config, module_name):
                unfiltered.append(full)
            row, reason = registry.dispatch_parameter(config.peft_type, module, pname, param)
            if row is None:
                plan.skipped.append((full, f"Parameter{shape}", reason or "unsupported"))
                if hits:
                    unsupported.append(f"{full} {shape}: {reason}")
                continue
            target = by_module.setdefault(module_name, Target(module_name, module, row))
            target.parameters[pname] = ParameterTarget(
                pname,
                full,
                shape,
                pattern_value(config.rank_pattern, full),
                pattern_value(config.alpha_pattern, full),
                wanted.get(full, 1),
            )
    plan.targets += list(by_module.values())
    _refuse_parameter_mistakes(config, spec, hit, names, unsupported, unfiltered, require_every_entry)
    if wanted:
        plan.all_linear = _recorded_all_linear(plan, [n for n, _ in user_modules(model) if n], names)


def _refuse_parameter_mistakes(
    config: AdapterConfig,
    spec: list[str],
    hit: set[str],
    names: list[str],
    unsupported: list[str],
    unfiltered: list[str],
    require_every_entry: bool,
) -> None:
    """Raise for a target_parameters entry matching nothing or naming a parameter the method cannot take;
    warn when exclude_modules / layers_to_transform would have left a named parameter out."""
    missing = [s for s in spec if s not in hit]
    if missing and (require_every_entry or not hit):
        raise NoTargetMatchedError(_no_parameter_message(missing, names))
    if unsupported:
        raise UnsupportedLayerError(
            f"{config.peft_type} cannot adapt {len(unsupported)} parameter(s) named in target_parameters: "
            + "; ".join(unsupported[:5])
            + ". Remove them from target_parameters."
        )
    if unfiltered:
        warnings.warn(
            f"target_parameters picks {len(unfiltered)} parameter(s) that exclude_modules / layers_to_transform "
            f"would leave out ({', '.join(unfiltered[:3])}{' ...' if len(unfiltered) > 3 else ''}): like the "
            "reference library, peftkit applies those filters to target_modules only, so that both select the "
            "same. Name only the parameters you want in target_parameters.",
            stacklevel=6,
        )


def _check_parameter_owner(full: str, module_name: str, module_targets: set[str], shared: str | None) -> None:
    if not module_name:
        raise UnsupportedLayerError(
            f"parameter {full!r} belongs to the model's top-level module, which cannot wrap itself; wrap the "
            "model in a parent module, or hold the parameter in a submodule"
        )
    if module_name in module_targets:
        raise UnsupportedLayerError(
            f"{module_name!r} is adapted as a module (target_modules) and its parameter {full!r} is named in "
            "target_parameters; one adapter cannot do both (the reference library refuses it too). Drop one "
            "of the two."
        )
    if shared is not None:
        raise UnsupportedLayerError(
            f"parameter {full!r} is the same tensor as {shared!r} (shared or tied); adapting it under one name "
            "would leave the other unadapted. Name only one of the two."
        )


def _filtered_out(config: AdapterConfig, module_name: str) -> bool:
    if config.exclude_modules and name_matches(config.exclude_modules, module_name):
        return True
    wanted = config.layers_to_transform
    wanted = [wanted] if isinstance(wanted, int) else wanted
    return bool(wanted) and layer_index(module_name + ".", config.layers_pattern) not in wanted


def _recorded_all_linear(plan: Plan, modules: list[str], parameters: list[str]) -> AllLinearParameters:
    """The explicit lists (and rank/alpha pattern keys) recording what all-linear chose on ``plan``, given
    every module and parameter name of the model."""
    chosen = [p.full_name for t in plan.targets for p in t.parameters.values()]
    linear = [t.name for t in plan.targets if not t.parameters]
    recorded = AllLinearParameters(
        anatomy.target_spec(modules, [linear])[0] if linear else [], parameter_spec(parameters, chosen)
    )
    fused = [p for t in plan.targets for p in t.parameters.values() if p.maps > 1]
    targeted = [t.name for t in plan.targets if not t.parameters] + chosen
    for leaf in dict.fromkeys(p.name for p in fused):
        group = [p for p in fused if p.name == leaf]
        key = rf".*\.{re.escape(leaf)}"  # the reference's own key, when it picks out exactly these weights
        if {n for n in targeted if re.match(rf"(.*\.)?({key})$", n)} != {p.full_name for p in group}:
            key = "|".join(re.escape(p.full_name) for p in group)
        if any(p.rank is None for p in group):
            recorded.fused_rank[key] = group[0].maps
        if any(p.alpha is None for p in group):
            recorded.fused_alpha[key] = group[0].maps
    return recorded


def parameter_spec(names: list[str], chosen: list[str]) -> list[str]:
    """A ``target_parameters`` list selecting exactly ``chosen`` among all parameter ``names``: the shortest
    suffixes that do (the reference library reads lists only), else the full names."""
    spec, _ = anatomy.target_spec(names, [chosen])
    return spec if isinstance(spec, list) else sorted(chosen)


def _no_parameter_message(missing: list[str], names: list[str]) -> str:
    suffixes = sorted({".".join(n.split(".")[i:]) for n in names for i in range(len(n.split(".")))})
    lines = []
    for entry in missing:
        close = difflib.get_close_matches(entry, suffixes, n=3, cutoff=0.5)
        hint = ", ".join(f"'{c}'" for c in close) if close else "none similar"
        lines.append(f"target_parameters entry {entry!r} matched 0 parameters; closest: {hint}")
    return "; ".join(lines) + (
        f". The model has {len(names)} parameters; list them with model.named_parameters() or "
        "`peftkit inspect MODEL`."
    )


def _bypassed_reason(model: nn.Module, peft_type: str, attention: str) -> str:
    reason = f"out_proj of nn.MultiheadAttention {attention!r}, which reads its weight without calling it"
    if registry.dispatch(peft_type, model.get_submodule(attention))[0] is not None:
        reason += (
            f"; target the attention module ({attention.rsplit('.', 1)[-1]!r}) to adapt both its projections"
        )
    return reason


def _selected(
    name: str, module: nn.Module, config: AdapterConfig, targets_spec: list[str] | str, heads: set[str]
) -> bool:
    """Whether the target spec, exclude_modules and the layer filter all pick module ``name``."""
    if config.exclude_modules and name_matches(config.exclude_modules, name):
        return False
    if targets_spec == ALL_LINEAR:
        # nn.MultiheadAttention holds linear maps it reads as weights: all-linear takes the module
        # where the method adapts it as a whole
        attention = isinstance(module, nn.MultiheadAttention) and registry.has_row_for(
            config.peft_type, module
        )
        if not (isinstance(module, LINEAR_TYPES) or attention) or name in heads:
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


def default_targets(model: nn.Module, config: AdapterConfig, structure: bool = True) -> DefaultTargets | None:
    """What ``target_modules=None`` means for ``config`` on ``model``.

    In order: the method's own rule on the model (``default_target_spec``, e.g. BitFit's biases); the
    reference library's table entry for the model_type, so that a default adapter is the reference's
    own; else the modules in the method's roles (``default_roles``), found by structure
    (core/anatomy.py). A table entry naming modules the model lacks (written for an older transformers)
    is passed over for the structure.

    With ``structure=False`` (the config names parameters to adapt: the reference library then takes only
    its table's default modules beside them) None is returned where the table has no entry.

    Raises:
        NoTargetMatchedError: none of these applies; the message says what to set.
    """
    spec = config.default_target_spec(model)
    if spec is not None:
        return DefaultTargets(spec, f"{config.peft_type}'s own rule", "rule")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    table: dict[str, list[str] | str] = getattr(config, "default_targets", {})
    names = [n for n, _ in user_modules(model) if n]
    stale = ""
    if model_type in table:
        entry = table[model_type]
        spec = entry if isinstance(entry, str) else list(entry)
        # every list entry must name some module (a regex, as a whole), or the entry is out of date
        probes: dict[str, list[str] | str] = {spec: spec} if isinstance(spec, str) else {e: [e] for e in spec}
        missing = [e for e, probe in probes.items() if not any(name_matches(probe, n) for n in names)]
        label = config.table_source(model_type)
        if not missing:
            return DefaultTargets(spec, label, "table")
        stale = f" (the {label} names modules this model lacks: {', '.join(missing)})"
    if not structure:
        return None
    found = _by_structure(model, names, config)
    if isinstance(found, DefaultTargets):
        found.source += stale
        return found
    known = f"defaults exist for {sorted(table)}" if table else "it has no table of defaults"
    raise NoTargetMatchedError(
        f"target_modules is None and {config.peft_type} has no default for model_type={model_type!r} "
        f"({known}){stale}; {found}; set target_modules, e.g. to '{ALL_LINEAR}' or a list of module names "
        f"such as {_example_linear_names(model)} (`peftkit inspect MODEL` lists a model's modules)"
    )


def _by_structure(model: nn.Module, names: list[str], config: AdapterConfig) -> DefaultTargets | str:
    """The modules in the method's roles as found by structure, or why there are none."""
    roles = config.default_roles()
    if not roles:
        return f"{config.peft_type} names no layer roles to look for by structure"
    found = anatomy.find(model)
    modules = dict(user_modules(model))
    able: dict[str, list[str]] = {}
    refused: list[str] = []
    for role in roles:
        able[role] = []
        for name in found.modules(role):
            reason = registry.dispatch(config.peft_type, modules[name])[1]
            if reason is None:
                able[role].append(name)
            else:
                refused.append(f"{name} ({type(modules[name]).__name__}: {reason})")
    groups: dict[str, list[str]] = {}
    covered: set[str] = set()
    for role in roles:  # a fused projection is query, key and value at once: it is listed once
        groups[role] = [n for n in able[role] if n not in covered]
        covered.update(groups[role])
    absent = [r for r in roles if not able[r] and r not in config.optional_roles]
    if absent or not covered:
        lacking = absent or list(roles)
        why = found.why_missing(lacking)
        if refused:
            why.append(f"{config.peft_type} cannot adapt {', '.join(refused[:2])}")
        return f"no {' or '.join(anatomy.ROLES[r] for r in lacking)} found by structure" + (
            f" ({'; '.join(why)})" if why else ""
        )
    used = {role: names_ for role, names_ in groups.items() if names_}
    spec, parts = anatomy.target_spec(names, list(used.values()))
    fused = any(a.fused for b in found.blocks for a in b.attention)
    what = ", ".join(
        anatomy.ROLES[r] + (" (fused query/key/value)" if fused and r in ("query", "key") else "")
        for r in used
    )
    return DefaultTargets(spec, f"found by structure: {what}", "structure", dict(zip(used, parts)))


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
    return (
        "; ".join(lines)
        + extra
        + f". The model has {len(names)} modules; list them with model.named_modules()."
    )

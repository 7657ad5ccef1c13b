"""Adapters written as plain LoRA: several combined into one (``combine``), one of another method
(``convert_to_lora``), or the difference between a fine-tuned model and its base (``extract_lora``).

Each works on effective deltas (``core/deltas.py``): what an adapter changes in each layer's weight, its
scaling, rsLoRA and per-module rank and alpha already applied, so adapters of any ranks and scalings
combine as they act. The result is a new LoRA adapter on the model, added the ordinary way (``inject``),
so it is saved, loaded and merged like any other, in the interchange format the reference library reads.
Its config is plain: ``lora_alpha`` equal to the rank (scaling 1), one rank per module through
``rank_pattern`` / ``alpha_pattern`` keyed by the escaped full module name, and ``lora_bias`` only where
a source changed a bias. How far each module's LoRA is from the exact delta is kept as a report
(:func:`combine_report`).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core import deltas as _deltas
from ..core import registry
from ..core.deltas import Approximation, Delta, Options
from ..core.inject import adapter_layers, inject, require_adapter, saved_modules, state_of
from ..core.targeting import name_matches, sequence_head_names, user_modules
from ..errors import AdapterNameError, ConfigError, NotCombinableError
from .lora import LoraConfig

PEFT_TYPE = "LORA"


@dataclass
class CombineReport:
    """How an adapter written by :func:`combine`, :func:`convert_to_lora` or :func:`extract_lora` was made.

    Attributes:
        kind: ``"combine"``, ``"convert"`` or ``"extract"``.
        sources: The adapters it was made from (for ``extract``: the fine-tuned model's class).
        weights: The weight of each source (combine).
        options: The method and its settings.
        modules: Module -> its rank and approximation error (:class:`~peftkit.core.deltas.Approximation`).
        heads: ``modules_to_save`` copies carried over, and how (``"copied"`` or ``"combined"``).
        not_carried: Parameters that changed but that a LoRA cannot hold (extract: norms, embeddings not
            targeted ...), with their relative change ||new - old|| / ||old||.
    """

    kind: str
    sources: list[str]
    weights: list[float] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    modules: dict[str, Approximation] = field(default_factory=dict)
    heads: dict[str, str] = field(default_factory=dict)
    not_carried: dict[str, float] = field(default_factory=dict)

    @property
    def max_relative_error(self) -> float:
        return max((a.relative_error for a in self.modules.values()), default=0.0)

    @property
    def parameters(self) -> int:
        """Numbers the LoRA factors hold (A and B of every module)."""
        return sum(self._sizes.get(m, 0) for m in self.modules)

    _sizes: dict[str, int] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "sources": self.sources,
            "weights": self.weights,
            "options": self.options,
            "modules": {m: a.to_dict() for m, a in self.modules.items()},
            "heads": self.heads,
            "not_carried": self.not_carried,
            "max_relative_error": self.max_relative_error,
            "lora_parameters": self.parameters,
        }

    def __str__(self) -> str:
        lines = [f"{'module':<60} {'rank':>5} {'exact':>6} {'rel. error':>11}"]
        for name, a in self.modules.items():
            lines.append(f"{name:<60} {a.rank:>5} {a.exact_rank:>6} {a.relative_error:>11.3e}")
        lines += [f"{name:<60} {'(' + how + ' in full)':>24}" for name, how in self.heads.items()]
        if self.not_carried:
            lines.append(f"changed but not carried by a LoRA ({len(self.not_carried)}):")
            lines += [f"  {n}: relative change {v:.3e}" for n, v in self.not_carried.items()]
        ranks = [a.rank for a in self.modules.values()]
        lines.append(
            f"{self.kind} {', '.join(self.sources)}: {len(ranks)} modules, ranks {min(ranks, default=0)}-"
            f"{max(ranks, default=0)}, {self.parameters:,} LoRA parameters, worst relative error "
            f"{self.max_relative_error:.3e}"
        )
        return "\n".join(lines)


def combine(
    model: nn.Module,
    adapters: Sequence[str],
    weights: Sequence[float],
    *,
    method: str = "linear",
    name: str = "combined",
    rank: int | None = None,
    energy: float | None = None,
    density: float | None = None,
    seed: int = 0,
    sign: str = "total",
) -> nn.Module:
    """Add adapter ``name``: a plain LoRA holding a weighted combination of ``adapters``' deltas.

    See :func:`peftkit.combine` for the methods and every argument.
    """
    adapters, weights = list(adapters), list(weights)
    options = Options(method, rank, energy, density, seed, sign)
    problems = options.problems() + _source_problems(model, adapters, weights)
    if problems:
        raise ConfigError(problems, what="combine")
    _check_free(model, name)
    per_adapter = [_deltas.adapter_deltas(model, a, additive_only=True) for a in adapters]
    results = {}
    for module in _module_order(model, per_adapter):
        results[module] = _deltas.combine_deltas(
            [d.get(module) for d in per_adapter], weights, options, module
        )
    heads, how = _combined_heads(model, adapters, weights, options)
    report = CombineReport("combine", adapters, weights, _settings(options), heads=how)
    configs = [state_of(model).configs[a] for a in adapters]
    return _install(model, name, results, heads, configs, report)


def convert_to_lora(
    model: nn.Module,
    adapter_name: str = "default",
    *,
    name: str | None = None,
    rank: int | None = None,
    energy: float | None = None,
) -> nn.Module:
    """Add a plain LoRA (named ``name``, default ``"<adapter_name>_lora"``) approximating adapter
    ``adapter_name`` by a truncated SVD of each of its layers' deltas. See :func:`peftkit.convert_to_lora`."""
    problems = _deltas.truncation_problems(rank, energy)
    if problems:
        raise ConfigError(problems, what="convert_to_lora")
    require_adapter(model, adapter_name)
    name = name or f"{adapter_name}_lora"
    _check_free(model, name)
    found = _deltas.adapter_deltas(model, adapter_name, additive_only=False)
    results = {module: _approximate(delta, rank, energy) for module, delta in found.items()}
    heads = {m: ("copied", d) for m, d in _deltas.head_deltas(model, adapter_name).items()}
    report = CombineReport("convert", [adapter_name], options=_truncation(rank, energy))
    report.heads = {m: how for m, (how, _) in heads.items()}
    return _install(model, name, results, heads, [state_of(model).configs[adapter_name]], report)


def extract_lora(
    model: nn.Module,
    finetuned: nn.Module,
    *,
    name: str = "extracted",
    rank: int | None = None,
    energy: float | None = None,
    target_modules: list[str] | str | None = None,
    modules_to_save: list[str] | None = None,
) -> nn.Module:
    """Add a plain LoRA ``name`` to ``model`` (the base) approximating ``finetuned`` (the same architecture
    after full fine-tuning) by a truncated SVD of each layer's weight difference. See
    :func:`peftkit.extract_lora`."""
    problems = _deltas.truncation_problems(rank, energy)
    if problems:
        raise ConfigError(problems, what="extract_lora")
    _check_free(model, name)
    if "_peftkit" in model.__dict__:
        _deltas.check_unmerged(model)
    base = dict(user_modules(model))
    tuned = dict(finetuned.named_modules())
    heads = sequence_head_names(model) if modules_to_save is None else list(modules_to_save)
    results, carried = {}, set()
    for module_name, module in base.items():
        if not _extractable(module_name, module, heads, target_modules):
            continue
        other = _twin(tuned, module_name, module)
        delta = Delta(
            dense=_deltas.as_matrix(
                module, (other.weight.detach() - module.weight.detach()).to(_deltas.DTYPE)
            )
        )
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor):
            change = (other.bias.detach() - bias.detach()).to(_deltas.DTYPE)
            delta.bias = change if bool(change.any()) else None
            carried.add(f"{module_name}.bias")
        carried.add(f"{module_name}.weight")
        if bool(delta.dense.any()) or delta.bias is not None:
            results[module_name] = _approximate(delta, rank, energy)
    head_values = {}
    for head in heads:
        if head not in base:
            raise NotCombinableError(
                f"modules_to_save: the model has no module {head!r}; name modules of the base"
            )
        other = _twin(tuned, head, base[head])
        head_values[head] = ("copied", {k: v.detach().clone() for k, v in other.state_dict().items()})
        carried.update(f"{head}.{k}" for k, _ in base[head].named_parameters())
    if not results:
        raise NotCombinableError(
            "the fine-tuned model's weights equal the base's in every module a LoRA could hold "
            f"(target_modules={target_modules!r}); is it the fine-tuned model, and the right base?"
        )
    report = CombineReport("extract", [type(finetuned).__name__], options=_truncation(rank, energy))
    report.heads = dict.fromkeys(heads, "copied")
    report.not_carried = _not_carried(model, finetuned, carried)
    return _install(model, name, results, head_values, [], report, absolute_heads=True)


def combine_report(model: nn.Module, adapter_name: str) -> CombineReport:
    """The :class:`CombineReport` of an adapter written by combine / convert_to_lora / extract_lora.

    Raises:
        AdapterNameError: no such adapter, or it was not made by one of them (trained or loaded).
    """
    state = require_adapter(model, adapter_name)
    report = state.reports.get(adapter_name)
    if not isinstance(report, CombineReport):
        raise AdapterNameError(
            f"adapter {adapter_name!r} was not made by combine, convert_to_lora or extract_lora, so it has no "
            "report (a loaded adapter does not keep one)"
        )
    return report


# -- checks ----------------------------------------------------------------------------------------


def _source_problems(model: nn.Module, adapters: list[str], weights: list[float]) -> list[str]:
    out = []
    known = list(state_of(model).configs) if "_peftkit" in model.__dict__ else []
    if not adapters:
        out.append("adapters: give at least one adapter name")
    unknown = [a for a in adapters if a not in known]
    if unknown:
        out.append(f"adapters: unknown {unknown}; adapters on this model: {sorted(known)}")
    repeated = sorted(a for a, n in Counter(adapters).items() if n > 1)
    if repeated:
        out.append(f"adapters: {repeated} given more than once; give each once with the sum of its weights")
    if len(weights) != len(adapters):
        out.append(f"weights: {len(weights)} weight(s) for {len(adapters)} adapter(s); give one per adapter")
    bad = [
        w for w in weights if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)
    ]
    if bad:
        out.append(f"weights: must be finite numbers (negative ones subtract an adapter), got {bad}")
    return out


def _check_free(model: nn.Module, name: str) -> None:
    state = model.__dict__.get("_peftkit")
    if state is not None and name in state.configs:
        # the reference library returns silently here, leaving the old adapter under the new name
        raise AdapterNameError(
            f"an adapter named {name!r} already exists (adapters: {sorted(state.configs)}); nothing was "
            f"changed. Pass another name, or peftkit.delete_adapter(model, {name!r}) first"
        )


def _extractable(name: str, module: nn.Module, heads: list[str], targets: list[str] | str | None) -> bool:
    if name in heads or registry.dispatch(PEFT_TYPE, module)[0] is None:
        return False
    if targets is not None:
        return name_matches(targets, name)
    # by default the weight matrices; embeddings only when named (LoRA's bias cannot sit on them)
    return not isinstance(module, nn.Embedding)


def _twin(tuned: dict[str, nn.Module], name: str, module: nn.Module) -> nn.Module:
    other = tuned.get(name)
    shapes = [tuple(p.shape) for p in module.parameters(recurse=False)]
    if other is None or [tuple(p.shape) for p in other.parameters(recurse=False)] != shapes:
        found = (
            "missing"
            if other is None
            else f"shapes {[tuple(p.shape) for p in other.parameters(recurse=False)]}"
        )
        raise NotCombinableError(
            f"the fine-tuned model has no module {name!r} shaped like the base's ({shapes}; found {found}): it is "
            "not the same architecture. Load both with the same class and config (num_labels included)"
        )
    return other


def _not_carried(model: nn.Module, finetuned: nn.Module, carried: set[str]) -> dict[str, float]:
    tuned = dict(finetuned.named_parameters())
    out = {}
    for module_name, module in user_modules(model):
        for pname, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{pname}" if module_name else pname
            other = tuned.get(full)
            if full in carried or other is None or other.shape != param.shape:
                continue
            if not torch.equal(other.detach(), param.detach()):
                out[full] = _deltas.relative_change(other.detach(), param.detach())
    return out


# -- building the LoRA -----------------------------------------------------------------------------


Result = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None", Approximation]


def _approximate(delta: Delta, rank: int | None, energy: float | None) -> Result:
    if delta.dense is not None:
        left, right, report = _deltas.factor_dense(delta.dense, rank, energy)
    else:
        left, right, report = _deltas.truncate(delta.left, delta.right, rank, energy)
    return left, right, delta.bias, report


def _settings(options: Options) -> dict[str, Any]:
    """The options that took part: DARE's seed and TIES's sign only where they were used."""
    used = {
        "method": options.method,
        "rank": options.rank,
        "energy": options.energy,
        "density": options.density,
    }
    if options.method.startswith("dare"):
        used["seed"] = options.seed
    if options.method in ("ties", "dare_ties"):
        used["sign"] = options.sign
    return {k: v for k, v in used.items() if v is not None}


def _truncation(rank: int | None, energy: float | None) -> dict[str, Any]:
    if rank is not None:
        return {"rank": rank}
    return {"energy": energy} if energy is not None else {"rank": "exact"}


def _module_order(model: nn.Module, per_adapter: list[dict[str, Delta]]) -> list[str]:
    wanted = {m for d in per_adapter for m in d}
    return [name for name, _ in adapter_layers(model) if name in wanted]


def _combined_heads(
    model: nn.Module, adapters: list[str], weights: list[float], options: Options
) -> tuple[dict[str, tuple[str, dict[str, torch.Tensor]]], dict[str, str]]:
    """Module -> ("copied" | "combined", tensor deltas) for the sources' ``modules_to_save`` copies.

    A copy only one source has is a replacement of the module (a trained head), taken as it is: a weight
    on it would mix a trained head with the untrained one. Copies of one module in several sources are
    combined as deltas from the model's own module, like the layers, which is meaningful when all were
    trained from its current values (the same base model object, or the same initialisation seed)."""
    per_adapter = [_deltas.head_deltas(model, a) for a in adapters]
    out = {}
    for module in dict.fromkeys(m for d in per_adapter for m in d):
        having = [(d[module], w, i) for i, (d, w) in enumerate(zip(per_adapter, weights)) if module in d]
        if len(having) == 1:
            out[module] = ("copied", having[0][0])
            continue
        keys = having[0][0].keys()
        out[module] = (
            "combined",
            {
                k: _deltas.combine_dense(
                    [h[k] for h, _, _ in having],
                    [w for _, w, _ in having],
                    options,
                    f"{module}.{k}",
                    [i for *_, i in having],
                )
                for k in keys
            },
        )
    return out, {m: how for m, (how, _) in out.items()}


def _lora_config(
    model: nn.Module,
    results: dict[str, Result],
    heads: dict[str, Any],
    configs: list[Any],
) -> LoraConfig:
    ranks = {m: left.shape[1] for m, (left, *_) in results.items()}
    counts = Counter(ranks.values())
    r = max(counts, key=lambda k: (counts[k], k))  # the most common rank; the others by pattern
    pattern = {re.escape(m): k for m, k in ranks.items() if k != r}
    biased = [m for m, (_, _, bias, _) in results.items() if bias is not None]
    modules = dict(user_modules(model))
    embeddings = [m for m in results if isinstance(modules.get(m), nn.Embedding)]
    if biased and embeddings:
        raise NotCombinableError(
            f"the result changes biases (in {biased[:3]}) and adapts embeddings ({embeddings[:3]}): a LoRA holds a "
            "bias change only with lora_bias=True, which embeddings do not take (nor in the reference library). "
            "Combine or convert the embedding adapters separately"
        )
    if heads:
        modules_to_save = sorted(heads)
    else:  # [] rather than None, or inject would add a fresh copy of a classification head
        modules_to_save = [] if sequence_head_names(model) else None
    task_types = {c.task_type for c in configs if c.task_type}
    sources = [c.base_model_name_or_path for c in configs if c.base_model_name_or_path]
    return LoraConfig(
        r=int(r),
        lora_alpha=int(r),
        target_modules=list(results),
        rank_pattern=dict(pattern),
        alpha_pattern=dict(pattern),  # alpha = rank everywhere: scaling 1, the factors hold the delta
        lora_bias=bool(biased),
        modules_to_save=modules_to_save,
        task_type=task_types.pop() if len(task_types) == 1 else None,
        base_model_name_or_path=sources[0] if sources else None,
    )


def _install(
    model: nn.Module,
    name: str,
    results: dict[str, Result],
    heads: dict[str, tuple[str, dict[str, torch.Tensor]]],
    configs: list[Any],
    report: CombineReport,
    absolute_heads: bool = False,
) -> nn.Module:
    """Inject the LoRA, write its factors, biases and head copies, and keep the report."""
    if not results:
        raise NotCombinableError(
            f"{report.kind} found no adapted layer in {report.sources}: nothing to write"
        )
    inject(model, _lora_config(model, results, heads, configs), name)
    layers = dict(adapter_layers(model))
    with torch.no_grad():
        for module, (left, right, bias, approximation) in results.items():
            adapter = layers[module].adapters[name]
            adapter.set_delta(left, right, bias)
            report.modules[module] = approximation
            report._sizes[module] = left.numel() + right.numel()
        copies = dict(saved_modules(model))
        for module, (_, values) in heads.items():
            copy = copies[module].copies[name]
            state = copy.state_dict()
            for key, value in values.items():
                new = (
                    value
                    if absolute_heads
                    else copies[module].base_layer.state_dict()[key].to(value.dtype) + value
                )
                state[key].copy_(new.to(state[key].dtype))
    state_of(model).reports[name] = report
    return model


__all__ = ["CombineReport", "combine", "convert_to_lora", "extract_lora", "combine_report"]

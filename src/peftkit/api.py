"""The verbs users call. Each takes the user's own model, changes it in place and returns it."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import methods  # noqa: F401  (registers the built-in methods)
from .core import inject as _inject
from .core import mixed as _mixed
from .core import moe, registry, tying
from .core.anatomy import user_modules
from .core.config import AdapterConfig
from .core.counting import count_parameters
from .core.inject import adapter_layers, model_parts, require_adapter, saved_modules, state_of
from .core.io import load_adapter, read_adapter_config, save_adapter
from .core.layer import ParameterAdapter, base_tensor
from .core.state_dict import adapter_state_dict, load_adapter_state_dict
from .errors import AdapterNameError, ConfigError, FreshAdapterWarning
from .methods import lora_combine as _combine
from .methods.lora_combine import CombineReport, combine_report


def inject(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> nn.Module:
    """Add an adapter to ``model`` in place and make it the (only) active, trainable one.

    Every base parameter is frozen; the new adapter's parameters, its ``modules_to_save`` copies
    (set automatically for sequence-classification heads) and any extra parameters the method trains
    are trainable. On error the model is unchanged.

    Raises:
        NoTargetMatchedError: a target matches no module (the message names the closest ones).
        UnsupportedLayerError: a named target is of a type the method cannot adapt.
        AdapterNameError: ``adapter_name`` is taken or malformed.
    """
    _inject.inject(model, config, adapter_name)
    for message in config.fresh_start_warnings(model, adapter_name):
        warnings.warn(message, FreshAdapterWarning, stacklevel=2)
    return model


def make_config(method: str, **fields: Any) -> AdapterConfig:
    """The config of the method named ``method`` ("lora", "ia3", "prefix_tuning" ...) with ``fields``.

    Switching method is then a change of one string; fields the method does not have are reported
    together with the fields it does have.

    Raises:
        ConfigError: ``method`` is unknown, a field does not exist for it, or a value is invalid.
    """
    try:
        config_cls = registry.find_method(method).config_cls
    except KeyError as exc:
        raise ConfigError([str(exc.args[0])], what="make_config") from None
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(fields) - names)
    if unknown:

        def problem(key: str) -> str:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"its fields are: {', '.join(sorted(names))}"
            return f"{config_cls.__name__} has no field {key!r}; {hint}"

        raise ConfigError([problem(k) for k in unknown], what=f"make_config({method!r})")
    return config_cls(**fields)


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters on ``model``, in the order they were added."""
    state = model.__dict__.get(_inject.STATE_ATTR)
    return list(state.configs) if state else []


def active_adapters(model: nn.Module) -> list[str]:
    return list(state_of(model).active)


def adapter_config(model: nn.Module, adapter_name: str = "default") -> AdapterConfig:
    state = require_adapter(model, adapter_name)
    return state.configs[adapter_name]


def set_active(model: nn.Module, names: str | list[str]) -> nn.Module:
    """Make ``names`` the active adapters (their deltas are summed); only they are trainable."""
    _inject.set_active(model, [names] if isinstance(names, str) else list(names))
    return model


@contextlib.contextmanager
def disable(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes exactly its base output (merged adapters are unmerged
    for the duration and merged back after, within floating-point rounding)."""
    merged = {name: list(layer.merged) for name, layer in adapter_layers(model)}
    wrappers = [w for _, w in adapter_layers(model)] + [w for _, w in saved_modules(model)]
    wrappers += list(model_parts(model).values())
    previous = [w.disabled for w in wrappers]  # nested blocks must not re-enable an outer one
    for _, layer in adapter_layers(model):
        layer.unmerge()
    for wrapper in wrappers:
        wrapper.disabled = True
    try:
        yield model
    finally:
        for wrapper, was in zip(wrappers, previous):
            wrapper.disabled = was
        for name, layer in adapter_layers(model):
            layer.merge(merged.get(name, []))


def per_example_adapters(
    model: nn.Module, names: Sequence[str | None]
) -> contextlib.AbstractContextManager[nn.Module]:
    """A context manager within which example ``i`` of every batch goes through adapter ``names[i]``
    alone (``None``: the base model), for serving several adapters in one batch.

    Inference only: the model must be in eval mode. Works for every forward inside the block,
    including each step of ``model.generate``; under beam search the batch is expanded ``num_beams``
    times, so each name must be repeated that often. Plain LoRA layers compute all adapters with one
    batched product; other methods run each group of rows through the layer with its adapter.

    Example::

        with peftkit.per_example_adapters(model, ["fr", "de", None, "fr"]):
            logits = model(input_ids).logits  # 4 examples, adapters fr, de, base, fr

    Raises:
        AdapterNameError: a name is not an adapter of the model (the message lists them), an adapter is
            merged (unmerge first), or an adapter changes the model as a whole (soft prompts).
        RuntimeError: the model is in training mode (call ``model.eval()``).
        ValueError: ``names`` is empty, or (at a forward) its length differs from the batch size.
    """
    return _mixed.per_example_adapters(model, names)


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Remove an inactive, unmerged adapter. To remove the last one, use :func:`unload`."""
    state = require_adapter(model, adapter_name)
    if adapter_name in state.active:
        others = [n for n in state.configs if n != adapter_name]
        fix = (
            f"set_active(model, {others[0]!r}) first"
            if others
            else "use unload(model) to remove the last adapter"
        )
        raise AdapterNameError(f"adapter {adapter_name!r} is active and cannot be deleted; {fix}")
    if any(adapter_name in layer.merged for _, layer in adapter_layers(model)):
        raise AdapterNameError(
            f"adapter {adapter_name!r} is merged into the base weights; unmerge(model) first"
        )
    _inject.remove_adapter(model, adapter_name)
    return model


def merge(
    model: nn.Module, adapter_names: str | list[str] | None = None, *, safe: bool = False, untie: bool = False
) -> nn.Module:
    """Fold adapters (default: the active ones) into the base weights; reversible with :func:`unmerge`.

    With ``safe=True`` every new weight is first computed out of place and checked for NaN/inf;
    :class:`~peftkit.errors.UnsafeMergeError` names the adapter and module, and no weight is changed.
    Merging refuses (before any change) an adapter that cannot be merged exactly, e.g. a DoRA adapter
    active beside another adapter on the same layer.

    A merge into a weight other modules share (LoRA on ``embed_tokens`` of a model whose ``lm_head`` is
    tied to it) would change them too: it raises :class:`~peftkit.errors.TiedWeightsError` unless
    ``untie=True``, which first gives the other modules their own copy of the weight (and sets
    ``config.tie_word_embeddings`` False, so a saved model stores both matrices). The copy stays after
    :func:`unmerge`. Trainable tokens change both sides of a tie on purpose and merge without it
    (docs/tokens.md).
    """
    names = _names(model, adapter_names)
    parts = model_parts(model)
    for name in names:
        if name in parts and not parts[name].mergeable:
            raise AdapterNameError(
                f"adapter {name!r} ({type(parts[name]).__name__}) changes the model's inputs or attention, not "
                "its weights, so it cannot be merged; keep it as an adapter, or unload(model) to drop it"
            )
    layers = [(layer, [n for n in names if n in layer.adapters]) for _, layer in adapter_layers(model)]
    layers = [(layer, wanted) for layer, wanted in layers if wanted]
    tied = tying.tied_merges(model, layers)
    if not untie:
        tying.refuse(tied)
    for layer, wanted in layers:  # refuse, or find a non-finite result, before touching any weight
        if safe:  # computing every merged weight twice is the price of a check that changes nothing
            layer.merge(wanted, safe=True, check_only=True)
        else:
            layer.check_mergeable([n for n in wanted if n not in layer.merged])
    tying.untie(model, tied)
    for layer, wanted in layers:
        layer.quantization_error = None
        layer.merge(wanted)
    errors = {layer.module_name: layer.quantization_error for layer, _ in layers if layer.quantization_error}
    if errors:
        worst = max(errors, key=lambda n: errors[n]["relative"])
        lost = max(e.get("of_delta", 0.0) for e in errors.values())
        warnings.warn(
            f"merged into {len(errors)} quantized layer(s): the re-quantized weights differ from the exact merged "
            f"ones by up to {max(e['max_abs'] for e in errors.values()):.3g} (max abs), relative error up to "
            f"{errors[worst]['relative']:.3g} (Frobenius, in {worst!r}), up to {lost:.3g} of the adapter's own "
            "change; details: peftkit.merge_report(model). For an exact merge export a dense model: "
            "unload(model, merge=True, dequantize=True).",
            QuantizedMergeWarning,
            stacklevel=2,
        )
    return model


class QuantizedMergeWarning(UserWarning):
    """A merge into a quantized base stored the merged weight re-quantized, i.e. not exactly."""


def merge_report(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per adapted module, the error the last merge into a quantized base introduced, comparing the
    re-quantized merged weight with the exact one (dequantized base + adapter delta): ``max_abs``,
    ``relative`` (Frobenius norm of the difference over that of the exact merged weight) and
    ``of_delta`` (over that of the adapter's delta: near 1, re-quantization rounded most of the adapter
    away). Layers merged exactly (dense bases) are absent."""
    return {
        name: dict(layer.quantization_error)
        for name, layer in adapter_layers(model)
        if layer.quantization_error
    }


_merge = merge  # unload() has a parameter named `merge`


def unmerge(model: nn.Module, adapter_names: str | list[str] | None = None) -> nn.Module:
    """Subtract merged adapters (default: all merged) from the base weights again."""
    names = None if adapter_names is None else _names(model, adapter_names)
    for _, layer in adapter_layers(model):
        layer.unmerge(names)
    return model


def unload(
    model: nn.Module, *, merge: bool = False, safe: bool = True, dequantize: bool = False, untie: bool = False
) -> nn.Module:
    """Remove every adapter and put the original module objects back.

    With ``merge=True`` the active adapters are first merged (safely by default), so the returned
    plain model computes what the adapted one did; otherwise the base model comes back unchanged
    (merged adapters are unmerged, PiSSA/OLoRA residuals and trained biases restored).

    With ``dequantize=True`` every quantized layer (bitsandbytes) is first replaced by a dense
    ``nn.Linear`` in its compute dtype, so ``merge=True`` is exact and the result is a plain 16/32-bit
    model; without it a merge into a quantized layer re-quantizes (see :func:`merge`).

    ``untie`` is :func:`merge`'s, for adapters on tied weights. When the returned model's input and output
    embeddings no longer share a weight (a ``modules_to_save`` copy of a tied embedding now stands in its
    place), its ``config.tie_word_embeddings`` is set to False with a warning, so that saving and
    reloading keep both.
    """
    state = state_of(model)
    if dequantize:
        from .backends.kbit import dequantize as _dequantize

        unmerge(model)  # merges made into the quantized weights come off before the exact dense merge
        _dequantize(model)
    if merge:
        _merge(model, list(state.active), safe=safe, untie=untie)
    else:
        unmerge(model)
    tied_before = tying.shared_weights(model)
    _inject.unload(model, restore_base=not merge)
    changed = tying.settle_tie_flags(model) if tied_before else []
    if changed and not untie:
        warnings.warn(
            f"the input and output embeddings of {', '.join(changed)} no longer share one weight (a trained copy "
            "replaced one of them); config.tie_word_embeddings was set to False so that save_pretrained and "
            "from_pretrained keep both",
            stacklevel=2,
        )
    return model


def quantize(
    model: nn.Module,
    bits: int = 4,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    skip: Iterable[str] = (),
) -> nn.Module:
    """Quantize ``model``'s ``nn.Linear`` layers in place with bitsandbytes (4-bit NF4/FP4 or 8-bit).

    The fresh classification head, the output embedding and modules named in ``skip`` stay in full
    precision. See :func:`peftkit.backends.bitsandbytes.quantize` for every argument.

    Raises:
        ImportError: bitsandbytes is not installed (the message says how to install it).
        ConfigError: invalid ``bits``/``quant_type``, or the model already holds adapters.
    """
    try:
        from .backends import bitsandbytes as bnb_backend
    except ImportError as exc:
        raise ImportError(f"peftkit.quantize needs bitsandbytes: {exc}") from None
    return bnb_backend.quantize(model, bits, quant_type, double_quant, compute_dtype, skip)


def prepare_for_kbit_training(model: nn.Module, gradient_checkpointing: bool = False) -> nn.Module:
    """Norms, head and other unquantized half-precision parameters to float32, base frozen, input
    embeddings' output requiring grad (for reentrant checkpointing); see
    :func:`peftkit.backends.kbit.prepare_for_kbit_training`."""
    from .backends.kbit import prepare_for_kbit_training as prepare

    return prepare(model, gradient_checkpointing)


def _names(model: nn.Module, adapter_names: str | list[str] | None) -> list[str]:
    state = state_of(model)
    names = (
        list(state.active)
        if adapter_names is None
        else ([adapter_names] if isinstance(adapter_names, str) else list(adapter_names))
    )
    unknown = [n for n in names if n not in state.configs]
    if unknown:
        raise AdapterNameError(
            f"unknown adapter(s) {unknown}; adapters on this model: {sorted(state.configs)}"
        )
    return names


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
    """Add adapter ``name``: one plain LoRA holding a weighted combination of ``adapters``, made active.

    Every method works on each adapter's effective delta per layer (its scaling, rsLoRA and per-module
    rank and alpha applied), so adapters of different ranks, patterns and scalings combine as they act; a
    layer an adapter leaves alone counts as a zero delta there. The result is exact for ``linear`` and
    ``cat``; the other methods end in a truncated SVD whose error :func:`combine_report` gives per module.

    Args:
        model: A model holding the adapters, none of them merged.
        adapters: Names of the adapters to combine (LoRA, rsLoRA, AdaLoRA, LoHa, LoKr, VeRA, linear
            parallel bottlenecks: adapters whose delta does not depend on the weight).
        weights: One number per adapter; negative ones subtract it (task negation).
        method: ``"linear"``: ``sum w_i delta_i`` exactly, written as the concatenation of the adapters'
            factors (rank = the sum of their ranks), or truncated by SVD with ``rank`` / ``energy``.
            ``"cat"``: the same concatenation, never truncated. ``"svd"``: the sum truncated to ``rank``
            (default: the largest source rank on each module). ``"ties"``: trim each delta to its
            ``density`` largest entries, elect each entry's sign from the weighted deltas, average the
            agreeing ones. ``"dare_linear"`` / ``"dare_ties"``: drop entries with probability
            ``1 - density`` (masks seeded by ``seed``), rescale by ``1 / density``, then sum or TIES-merge.
            ``"magnitude_prune"``: trim as TIES does, then sum. The last four are truncated like ``svd``.
        name: The new adapter's name; must not exist yet.
        rank: The rank to truncate to (``linear``, ``svd`` and the pruning methods).
        energy: Instead of ``rank``: the smallest rank keeping this share of the squared singular values.
        density: Share of entries kept by ``ties``, ``dare_*`` and ``magnitude_prune``, in (0, 1].
        seed: Seed of DARE's masks: the same seed gives the same adapter on every machine.
        sign: TIES's election: ``"total"`` (sign of the summed values) or ``"frequency"`` (of the count).

    ``modules_to_save`` copies (classification heads): a copy only one adapter has is taken as it is;
    copies of the same module in several adapters are combined as deltas from the model's own module.

    Raises:
        ConfigError: an unknown method or adapter, a weight per adapter missing, or an option the method
            does not take (every problem is listed).
        AdapterNameError: ``name`` exists already, or an adapter is merged (unmerge first).
        NotCombinableError: an adapter is DoRA, IA3 or OFT (convert it with :func:`convert_to_lora`
            first), or changes no weights (soft prompts, non-linear bottlenecks), or trains base biases.
    """
    return _combine.combine(
        model,
        adapters,
        weights,
        method=method,
        name=name,
        rank=rank,
        energy=energy,
        density=density,
        seed=seed,
        sign=sign,
    )


def convert_to_lora(
    model: nn.Module,
    adapter_name: str = "default",
    *,
    name: str | None = None,
    rank: int | None = None,
    energy: float | None = None,
) -> nn.Module:
    """Add a plain LoRA (``name``, default ``"<adapter_name>_lora"``) that approximates ``adapter_name``,
    made active: for engines and tools that only read LoRA.

    Each adapted layer's delta (LoHa, LoKr, VeRA, AdaLoRA, IA3, OFT, DoRA, linear bottleneck adapters:
    what merging the adapter alone would add to the weight) is written as the truncated SVD of the delta;
    a bias change (IA3, bottleneck) as LoRA's ``lora_bias``; ``modules_to_save`` copies as they are.
    :func:`combine_report` gives each module's rank and relative Frobenius error.

    Args:
        rank: The rank of every module (lower where the delta's own rank is lower).
        energy: Instead: per module, the smallest rank keeping this share of the squared singular values.
            Neither: the exact delta (every singular value above float32 rounding).

    Raises:
        NotCombinableError: the adapter changes no weights (soft prompts, non-linear bottlenecks), rewrote
            the base at init (PiSSA/OLoRA: save it with ``portable=True`` instead), or trains base biases.
    """
    return _combine.convert_to_lora(model, adapter_name, name=name, rank=rank, energy=energy)


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
    """Add a plain LoRA ``name`` to ``model`` (the base) approximating ``finetuned``, the same architecture
    after full fine-tuning: each layer's weight difference as its truncated SVD, bias changes as
    ``lora_bias``, fresh classification heads (or ``modules_to_save``) copied in full. What changed but a
    LoRA cannot hold (norms, embeddings not targeted) is listed in :func:`combine_report`'s ``not_carried``.

    Args:
        target_modules: Which layers (the usual matching rules); default: every layer a LoRA can adapt
            except embeddings and heads.
        rank / energy: As in :func:`convert_to_lora`.
    """
    return _combine.extract_lora(
        model,
        finetuned,
        name=name,
        rank=rank,
        energy=energy,
        target_modules=target_modules,
        modules_to_save=modules_to_save,
    )


@dataclass
class TrainableSummary:
    """What :func:`trainable_summary` found; ``str()`` gives the readable table."""

    # module (or module.parameter, for a parameter adapted directly), kind, adapter, params
    adapted: list[tuple[str, str, str, int]] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # module or parameter, type, reason
    modules_to_save: list[tuple[str, str, int]] = field(default_factory=list)  # module, adapter, params
    # mixture-of-experts weights held as parameters, and routers: name, what it is, what was done with it
    experts: list[tuple[str, str, str]] = field(default_factory=list)
    trainable: int = 0
    total: int = 0
    _parameter_rows: set[str] = field(default_factory=set, repr=False)  # adapted rows that are parameters

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        lines = [f"{'module':<56} {'kind':<26} {'adapter':<10} {'params':>10}"]
        for name, kind, adapter, count in self.adapted:
            lines.append(f"{name:<56} {kind:<26} {adapter:<10} {count:>10,}")
        for name, adapter, count in self.modules_to_save:
            lines.append(f"{name:<56} {'full copy':<26} {adapter:<10} {count:>10,}")
        if self.skipped:
            lines.append(f"matched but not adapted ({len(self.skipped)}):")
            lines += [f"  {name} ({kind}): {reason}" for name, kind, reason in self.skipped]
        if self.experts:
            lines.append(f"mixture of experts: {len(self.experts)} expert weights and routers:")
            lines += [f"  {name:<54} {what:<30} {status}" for name, what, status in self.experts]
            if any(status.startswith("frozen") for *_, status in self.experts):
                lines.append(
                    "  (frozen ones: target_modules='all-linear' or target_parameters=[...] adapts them; "
                    "modules_to_save=[<router>] trains a router in full; docs/moe.md)"
                )
        by_parameter = sum(1 for name, *_ in self.adapted if name in self._parameter_rows)
        counts = f"adapted modules: {len(self.adapted) - by_parameter}"
        if by_parameter:
            counts += f" | adapted parameters: {by_parameter}"
        lines.append(
            f"{counts} | trainable params: {self.trainable:,} || "
            f"all params: {self.total:,} || trainable%: {self.percent:.4f}"
        )
        return "\n".join(lines)


def trainable_summary(model: nn.Module, *, show: bool = True) -> TrainableSummary:
    """Which modules were adapted (kind, added parameters), trainable vs total parameters, and which
    matched modules could not be adapted. Prints the table unless ``show=False``."""
    summary = TrainableSummary()
    state = model.__dict__.get(_inject.STATE_ATTR)
    if state is not None:
        for name, layer in adapter_layers(model):
            for adapter_name, adapter in layer.adapters.items():
                if isinstance(adapter, ParameterAdapter) and adapter.per_parameter:  # one row per parameter
                    for pname, count in adapter.parameter_sizes().items():
                        shape = tuple(base_tensor(layer.base_layer, pname).shape)
                        summary.adapted.append(
                            (f"{name}.{pname}", f"{adapter.describe(pname)} {shape}", adapter_name, count)
                        )
                        summary._parameter_rows.add(f"{name}.{pname}")
                    continue
                kind = f"{type(adapter).__name__}({type(layer.base_layer).__name__})"
                summary.adapted.append(
                    (name, kind, adapter_name, sum(p.numel() for p in adapter.parameters()))
                )
        for adapter_name, part in model_parts(model).items():
            kind = f"{type(part).__name__}(model)"
            summary.adapted.append(
                ("(whole model)", kind, adapter_name, sum(p.numel() for p in part.parameters()))
            )
        for name, wrapper in saved_modules(model):
            for adapter_name, copy in wrapper.copies.items():
                summary.modules_to_save.append(
                    (name, adapter_name, sum(p.numel() for p in copy.parameters()))
                )
        seen = set()
        for plan in state.plans.values():
            for item in plan.skipped:
                if item[0] not in seen:
                    seen.add(item[0])
                    summary.skipped.append(item)
    summary.experts = _experts_report(model)
    summary.trainable, summary.total = count_parameters(model)
    if show:
        print(summary)
    return summary


def _experts_report(model: nn.Module) -> list[tuple[str, str, str]]:
    """Every stacked expert weight and router of a MoE model, with what was done with it: adapted (by which
    adapters, how), trained in full, or frozen. Listed whether or not anything was adapted."""
    layers, saved = dict(adapter_layers(model)), dict(saved_modules(model))
    modules = dict(user_modules(model))
    rows = []

    def status(module: str, pname: str | None) -> str:
        layer = layers.get(module)
        if layer is not None:
            how = [
                f"{n} ({a.describe(pname) if isinstance(a, ParameterAdapter) else type(a).__name__})"
                for n, a in layer.adapters.items()
                if (pname in a.merge_into if isinstance(a, ParameterAdapter) else pname is None)
            ]
            if how:
                return "adapted: " + ", ".join(how)
        if module in saved:
            return f"trained in full (modules_to_save): {', '.join(saved[module].copies)}"
        param = getattr(modules.get(module), pname or "weight", None)
        if isinstance(param, torch.Tensor) and param.requires_grad:
            return "trainable in full (its requires_grad is set)"
        return "frozen, not adapted"

    for block in moe.find(model):
        for weight in block.weights:
            module, _, pname = weight.name.rpartition(".")
            rows.append((weight.name, f"{weight.role} {weight.shape}", status(module, pname)))
        if block.router is not None:
            shape = tuple(modules[block.router].weight.shape)
            router = status(block.router, None) if block.router_linear else status(block.router, "weight")
            rows.append((block.router, f"router {shape}", router))
    return rows


__all__ = [
    "inject",
    "make_config",
    "adapter_names",
    "active_adapters",
    "adapter_config",
    "set_active",
    "disable",
    "delete_adapter",
    "merge",
    "unmerge",
    "unload",
    "trainable_summary",
    "TrainableSummary",
    "save_adapter",
    "load_adapter",
    "read_adapter_config",
    "adapter_state_dict",
    "load_adapter_state_dict",
    "quantize",
    "prepare_for_kbit_training",
    "merge_report",
    "QuantizedMergeWarning",
    "combine",
    "convert_to_lora",
    "extract_lora",
    "combine_report",
    "CombineReport",
]

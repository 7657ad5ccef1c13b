"""The one wrapper every adapted module becomes, and the protocol a method's adapter implements.

An :class:`AdapterLayer` owns the original module as ``base_layer`` and one :class:`AdapterModule`
per adapter name. Merge, unmerge, enable/disable and activation are written here once; a method only
says how its adapter changes the output (``delta_output``) and the weight (``delta_weight``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..errors import AdapterNameError, UnsafeMergeError, UnsupportedLayerError
from . import registry


class AdapterModule(nn.Module):
    """One adapter's parameters on one base layer. Subclassed once per method and layer kind.

    Every parameter and persistent buffer of an AdapterModule belongs to the adapter: this module
    *is* the declaration of which tensors are adapter tensors (STYLE.md rule 3). Its ``state_dict``
    keys are the interchange-format suffixes (``lora_A.weight``, ``lora_magnitude_vector`` ...).
    """

    mergeable: bool = True
    # Why merge() refuses an adapter with ``mergeable = False``, for the error (e.g. a grouped convolution's
    # LoRA, whose delta is a dense kernel the grouped weight cannot hold).
    unmergeable_reason: str = ""
    # None when per_example_adapters (core/mixed.py) can route examples through the adapter; else why not.
    unroutable: str | None = None
    # True when the adapter's effect is a fixed delta whatever else is merged (LoRA); False when it
    # depends on the weight it is applied to (DoRA's normalisation).
    additive: bool = True
    # True when attach() rewrites the base weight (PiSSA/OLoRA residuals).
    rewrites_base: bool = False
    # The base layer's tensors a merge writes into, by attribute name (BitFit merges into "bias").
    merge_into: tuple[str, ...] = ("weight",)
    # "input" / "output" when the adapter transforms the base layer's input or output instead of adding
    # a delta: the layer calls ``transform`` there, so the base runs once and such adapters compose.
    # "parameters" when the base runs once with its ``merge_into`` tensors changed as ``merged_tensors``
    # changes them (a ParameterAdapter; trainable tokens, which replace rows of an embedding).
    transforms: str | None = None
    # True when a change to a weight other modules share (tied embeddings) is meant for all of them: the
    # method puts an adapter on every module holding the weight that makes the same change (trainable
    # tokens: a token's row is both its input embedding and its output weight), so a merge into the
    # shared tensor keeps merged == unmerged. False: merging into a shared weight is refused (core/tying.py).
    keeps_ties: bool = False

    def delta_output(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        """What this adapter adds to ``base_out`` (the base layer's output for input ``x``)."""
        raise NotImplementedError

    def fused_output(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor | None:
        """The layer's whole output with this adapter (``base_layer(x) + delta_output(...)``, or the
        base around its ``transform``) in one step, or None for the general path. Asked only when this
        adapter is the one live adapter on its layer and the layer is called with ``x`` alone; a method
        overrides it where computing both together saves time or memory."""
        return None

    @classmethod
    def routed_output(
        cls,
        adapters: list[AdapterModule],
        slots: torch.Tensor,
        x: torch.Tensor,
        base_layer: nn.Module,
        cache: dict,
    ) -> torch.Tensor | None:
        """A mixed-adapter batch in one step (see ``core/mixed.py``), or None to run each group of rows
        through the layer separately. Example ``i`` goes through ``adapters[slots[i]]`` alone, or through
        the base alone where ``slots[i] == len(adapters)``; every adapter is of this class. ``cache`` is
        this layer's own dict for as long as the routing lasts (e.g. for stacked adapter tensors)."""
        return None

    def transform(self, tensor: torch.Tensor) -> torch.Tensor:
        """The base layer's new input (or output), for adapters that set ``transforms`` (used instead
        of ``delta_output``)."""
        raise NotImplementedError

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The change this adapter makes to ``weight`` (in the base layer's own layout)."""
        raise NotImplementedError

    def delta_factors(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``delta_weight(weight)`` as two factors ``(left, right)``, (out x k) and (k x fan_in), whose
        product is the delta as a channel matrix (``core.deltas.as_matrix``: one row per output channel),
        scaling included; None when the method has no such form. Lets adapters be combined exactly at
        rank k instead of through an SVD of the dense delta."""
        return None

    def attach(self, base_layer: nn.Module) -> None:
        """Called once the adapter sits on its layer; inits that rewrite the base weight (PiSSA) do it here."""

    def detach_from(self, base_layer: nn.Module) -> None:
        """Undo what :meth:`attach` did to the base *weights*, when the adapter is removed unmerged."""

    def release(self, base_layer: nn.Module) -> None:
        """Remove what :meth:`attach` installed besides weight changes (e.g. forward hooks); called
        whenever the adapter leaves the model, merged or not."""

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight with this adapter merged in. Must not modify ``weight`` in place."""
        return weight + self.delta_weight(weight)

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Invert :meth:`merged_weight`; overridden where the delta depends on the weight (DoRA)."""
        return weight - self.delta_weight(weight)

    def merged_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``merge_into`` tensors (by name) with this adapter merged; methods merging more than the
        weight override this pair instead of ``merged_weight``/``unmerged_weight``."""
        return {"weight": self.merged_weight(tensors["weight"])}

    def unmerged_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"weight": self.unmerged_weight(tensors["weight"])}

    def interchange_state(self, portable: bool = False) -> dict[str, torch.Tensor]:
        """Tensors to save, keyed by their interchange-format suffix.

        With ``portable`` the tensors must describe the adapter relative to the *original* base
        weights, for readers that will not re-run an init that rewrote them (see ``attach``).
        """
        return dict(self.state_dict())


class ParameterAdapter(AdapterModule):
    """An adapter on named ``nn.Parameter`` tensors of its base module (the reference library's
    ``target_parameters``), for weights that no linear layer holds: the stacked experts of a
    mixture-of-experts block, a router's scoring weight; or for a module that reads its weights without
    calling a layer (``nn.MultiheadAttention``'s packed projection and its ``out_proj``).

    The module's forward is not known (it may index one expert's slice, or hand the whole stack to a
    grouped kernel), so the delta cannot be added to an output. Instead the layer calls the base module
    once with ``W + delta`` in place of each adapted ``W`` (``torch.func.functional_call``), and merging
    writes the same sum into ``W``: merged and unmerged outputs agree by construction. ``merge_into`` is
    the adapted parameters' names on the base module (dotted for a submodule's: ``"out_proj.weight"``);
    a method implements :meth:`parameter_delta`.
    """

    transforms = "parameters"
    # Reports list one row per adapted parameter (target_parameters); False: the module itself was the
    # target and is listed once, as a module adapter is.
    per_parameter: bool = True
    unroutable = (
        "they adapt parameters (target_parameters, e.g. stacked experts), whose modules see tokens gathered "
        "from the whole batch rather than examples (the reference library refuses it too)"
    )

    def __init__(self, names: list[str]) -> None:
        super().__init__()
        self.merge_into = tuple(names)

    def parameter_delta(self, name: str) -> torch.Tensor:
        """The change to parameter ``name``, in its own shape (and the adapter's dtype)."""
        raise NotImplementedError

    def parameter_sizes(self) -> dict[str, int]:
        """How many trainable numbers the adapter holds for each parameter (for summaries)."""
        raise NotImplementedError

    def describe(self, name: str) -> str:
        """How reports name the adapter on parameter ``name`` (e.g. "LoRA r=8 per expert")."""
        return type(self).__name__

    def merged_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: t + self.parameter_delta(n).to(t.dtype) for n, t in tensors.items()}

    def unmerged_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: t - self.parameter_delta(n).to(t.dtype) for n, t in tensors.items()}


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype of an adapter's own tensors for a base weight: float32 for half-precision (and
    integer, i.e. quantized) bases, since an adapter is small and its updates would not survive bf16
    rounding (the reference library does the same by default); the weight's dtype otherwise."""
    if not weight.is_floating_point() or weight.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return weight.dtype


def base_tensor(module: nn.Module, name: str) -> torch.Tensor:
    """The tensor ``name`` of ``module``; a dotted name reaches into a submodule (``"out_proj.weight"``)."""
    owner, _, leaf = name.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, leaf)


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    # Merging in half precision on CPU is both slow and lossy: do the arithmetic in float32, round once.
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype


class AdapterLayer(nn.Module):
    """A base module plus any number of named adapters; output = base + sum of active adapters' deltas."""

    def __init__(self, base_layer: nn.Module, module_name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.module_name = module_name
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False
        # {"max_abs", "relative"} of the last merge/unmerge into a quantized base (None when exact)
        self.quantization_error: dict[str, float] | None = None

    def __getattr__(self, name: str):
        # transformers code reads e.g. `self.q_proj.weight.dtype`: let such reads reach the base layer.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_layer"), name)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled:
            return self.base_layer(x, *args, **kwargs)
        routing = self.__dict__.get("routing")  # inside peftkit.per_example_adapters
        if routing is not None:
            return routing.layer_forward(self, x, args, kwargs)
        live = [self.adapters[n] for n in self.active if n not in self.merged]
        if len(live) == 1 and not args and not kwargs:
            fused = live[0].fused_output(x, self.base_layer)
            if fused is not None:
                return fused
        # Adapters that act on the input (IA3 on feed-forward layers, OFT's rotation) or rescale the
        # output (IA3) compose in order around one call of the base; the others add their deltas.
        base_in = x
        for adapter in live:
            if adapter.transforms == "input":
                base_in = adapter.transform(base_in)
        out = self._call_base(live, base_in, args, kwargs)
        for adapter in live:
            if adapter.transforms == "output":
                out = adapter.transform(out)
        adding = [a for a in live if a.transforms is None]
        if adding:
            # delta_output is defined against the plain base output (some methods recompute the
            # layer and subtract it): beside a transform that costs one more base call.
            plain = out if len(adding) == len(live) else self.base_layer(x, *args, **kwargs)
            for adapter in adding:
                out = out + adapter.delta_output(x, plain, self.base_layer)
        return out

    def _call_base(self, live: list[AdapterModule], x: torch.Tensor, args: tuple, kwargs: dict):
        """The base layer on ``x``, its parameters changed by the live adapters with ``transforms =
        "parameters"`` exactly as merging them would change them (``merged_tensors`` in the merge's
        compute dtype, in the same order, rounded once): merged and unmerged outputs agree exactly."""
        changing = [a for a in live if a.transforms == "parameters"]
        if not changing:
            return self.base_layer(x, *args, **kwargs)
        params: dict[str, torch.Tensor] = {}
        for adapter in changing:
            current = {}
            for name in adapter.merge_into:
                weight = base_tensor(self.base_layer, name)  # a dotted name reaches a submodule's tensor
                current[name] = params[name] if name in params else weight.to(_compute_dtype(weight))
            params.update(adapter.merged_tensors(current))
        params = {n: t.to(base_tensor(self.base_layer, n).dtype) for n, t in params.items()}
        return torch.func.functional_call(self.base_layer, params, (x, *args), kwargs)

    # -- merging, written once for every method --------------------------------------------------

    def _read_tensors(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Dense copies (in the merge's compute dtype) of the base tensors ``names`` merge into.

        A quantized base layer is read through its backend's :class:`~peftkit.core.registry.BaseAccess`
        (dequantized); a layer storing integers with no backend cannot be merged into.
        """
        wanted = dict.fromkeys(k for n in names for k in self.adapters[n].merge_into)
        access = registry.base_access(self.base_layer)
        if access is not None:
            return {k: access.read(self.base_layer, k) for k in wanted}
        tensors = {k: base_tensor(self.base_layer, k) for k in wanted}
        for key, tensor in tensors.items():
            if not tensor.is_floating_point():
                raise UnsupportedLayerError(
                    f"cannot merge into {self.module_name!r}: its {key} is stored as {tensor.dtype} by "
                    f"{type(self.base_layer).__name__}, a layer type no peftkit backend can dequantize. Keep "
                    "the adapter unmerged, or replace the layer by a dense one before merging."
                )
        return {k: t.detach().to(_compute_dtype(t)) for k, t in tensors.items()}

    def _write_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Store merged tensors into the base layer; remembers the error a quantized store introduced."""
        access = registry.base_access(self.base_layer)
        errors = []
        for key, tensor in tensors.items():
            if access is not None:
                errors.append(access.write(self.base_layer, key, tensor))
            else:
                target = base_tensor(self.base_layer, key)
                target.data.copy_(tensor.to(target.dtype))
        errors = [e for e in errors if e]
        # The worst error over the tensors written (weight and bias), for merge reports.
        self.quantization_error = {k: max(e[k] for e in errors) for k in errors[0]} if errors else None

    def merge(self, names: Iterable[str], safe: bool = False, check_only: bool = False) -> None:
        """Merge ``names`` in order. All new tensors are computed out of place first; with ``safe``
        each is checked for NaN/inf, and the base tensors are written once, only if every check passed.
        ``check_only`` runs the computation and checks without writing anything."""
        names = [n for n in dict.fromkeys(names) if n not in self.merged]
        if not names:
            return
        self.check_mergeable(names)
        access = registry.base_access(self.base_layer)
        with torch.no_grad():
            new = self._read_tensors(names)
            if access is not None and not self.merged and not check_only:
                self.__dict__["_pristine"] = access.snapshot(self.base_layer)  # not registered as a parameter
            for name in names:
                adapter = self.adapters[name]
                new.update(adapter.merged_tensors({k: new[k] for k in adapter.merge_into}))
                bad = sum(int((~torch.isfinite(t)).sum()) for t in new.values())
                if safe and bad:
                    raise UnsafeMergeError(
                        f"merging adapter {name!r} into {self.module_name!r} would write {bad} non-finite "
                        "value(s) into the base weights; they were left unchanged. Check the "
                        "adapter's tensors (e.g. a diverged training run) before merging."
                    )
            if check_only:
                return
            self._write_tensors(new)
        self.merged.extend(names)

    def check_mergeable(self, names: list[str]) -> None:
        """Raise, without changing anything, if ``names`` cannot be merged exactly into this layer."""
        for name in names:
            adapter = self.adapters[name]
            if not adapter.mergeable:
                why = f" ({adapter.unmergeable_reason})" if adapter.unmergeable_reason else ""
                raise AdapterNameError(
                    f"adapter {name!r} on {self.module_name!r} ({type(adapter).__name__}) cannot be merged{why}; "
                    "keep it unmerged, or unload(merge=False)"
                )
        # A non-additive adapter (DoRA rescales the whole weight) gives a different result merged
        # than unmerged when another adapter is active or merged on the same layer: refuse.
        involved = list(dict.fromkeys(self.merged + self.active + names))
        blocking = [n for n in involved if not self.adapters[n].additive]
        if blocking and len(involved) > 1:
            raise AdapterNameError(
                f"cannot merge into {self.module_name!r}: adapter(s) {blocking} rescale the whole weight (e.g. "
                f"DoRA), so merged and unmerged outputs would differ with {involved} on the layer together. "
                "Activate one of them alone (set_active) before merging."
            )

    def unmerge(self, names: Iterable[str] | None = None) -> None:
        """Unmerge ``names`` (default: all). Merges are undone last-in first-out, since a
        weight-dependent delta (DoRA) must see the weight it was merged into; adapters merged after
        the earliest requested one are unmerged too, then merged back."""
        wanted = set(self.merged if names is None else names) & set(self.merged)
        if not wanted:
            return
        first = min(self.merged.index(n) for n in wanted)
        undone = self.merged[first:]
        for name in reversed(undone):
            adapter = self.adapters[name]
            with torch.no_grad():
                unmerged = adapter.unmerged_tensors(self._read_tensors([name]))
                pristine = self.__dict__.get("_pristine")
                if pristine is not None and self.merged == [name]:
                    # back to the unmerged base: the stored original, not a re-quantized approximation
                    registry.base_access(self.base_layer).restore(self.base_layer, pristine)
                    self.__dict__["_pristine"] = self.quantization_error = None
                else:
                    self._write_tensors(unmerged)
            self.merged.remove(name)
        self.merge([n for n in undone if n not in wanted])


class ModulesToSave(nn.Module):
    """A module trained in full: a trainable copy per adapter, the original kept for the base model."""

    def __init__(self, base_layer: nn.Module, module_name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.copies = nn.ModuleDict()
        self.module_name = module_name
        self.active: list[str] = []
        self.disabled = False

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_layer"), name)

    def add_copy(self, adapter_name: str) -> nn.Module:
        clone = copy.deepcopy(self.base_layer)
        for param in clone.parameters():
            param.requires_grad_(True)
        self.copies[adapter_name] = clone
        return clone

    def current(self) -> nn.Module:
        if not self.disabled:
            for name in self.active:
                if name in self.copies:
                    return self.copies[name]
        return self.base_layer

    def forward(self, *args, **kwargs):
        routing = self.__dict__.get("routing")  # inside peftkit.per_example_adapters
        if routing is not None and not self.disabled:
            return routing.copies_forward(self, args, kwargs)
        return self.current()(*args, **kwargs)


class ModelPart(nn.Module):
    """Adapter state that belongs to the whole model rather than to one layer, for one adapter.

    Soft prompts and prompt encoders, or matrices shared by every layer (VeRA), live here. Parts are
    held in the model's ``peftkit_parts`` dict (so ``.to()``, ``parameters()`` and optimizers see
    them) and the core treats their parameters and buffers as the adapter's own, like an
    :class:`AdapterModule`'s.
    """

    mergeable: bool = False
    # True when at most one part of this kind may be active at a time (two soft prompts cannot both
    # prefix the input); set_active refuses such a combination.
    exclusive: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.active = False
        self.disabled = False

    def attach(self, model: nn.Module) -> None:
        """Install what the part needs on ``model`` (e.g. forward hooks); called once, after registration."""

    def detach(self, model: nn.Module) -> None:
        """Undo :meth:`attach`."""

    def interchange_state(self, portable: bool = False) -> dict[str, torch.Tensor]:
        """Tensors to save, keyed by their *full* key in the interchange format."""
        return {}

    def loaded(self, tensors: dict[str, torch.Tensor]) -> None:
        """Called once a load has copied saved tensors into the ``interchange_state`` slots, with every
        loaded tensor by full key. A part whose saved form differs from its trained form (a prompt
        encoder, saved as its output) takes the saved form over here."""

    @property
    def enabled(self) -> bool:
        return self.active and not self.disabled


class ModelParts(nn.ModuleDict):
    """The container registered on a model as ``peftkit_parts``: adapter name -> :class:`ModelPart`."""

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        # An nn.Sequential model calls every child in turn, this container included (it is registered
        # as a child so that .to(), state_dict() and parameters() see the parts): pass the input through.
        return x

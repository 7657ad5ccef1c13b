"""Mixed-adapter batches: one forward in which each example goes through its own adapter.

:func:`per_example_adapters` installs a :class:`Routing` on every :class:`~peftkit.core.layer.AdapterLayer`
and :class:`~peftkit.core.layer.ModulesToSave` of the model; their ``forward`` hands the call to it.
For each layer the routing first offers the whole batch to the adapters' class
(``AdapterModule.routed_output``: LoRA stacks its adapters and runs one batched product); otherwise it
falls back to running each group of rows through the layer with that group's adapter alone and
writing the results into the output rows, which is exact for any method whose layer output depends
only on the layer's own inputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import AdapterNameError
from .inject import ROUTED_CACHE_ATTR, adapter_layers, model_parts, saved_modules, state_of
from .layer import AdapterLayer, ModulesToSave

ROUTING_ATTR = "routing"  # stored in the wrappers' __dict__; absent or None means "not routed"
# Per layer, what routed_output prepared for a set of adapters (LoRA: their concatenated factors) is kept
# across routing blocks (ROUTED_CACHE_ATTR, emptied when an adapter leaves the layer): a server opens one
# block per decode step, and the same rows keep the same adapters for many steps. The entries check the
# tensors' versions; the last few sets are kept.
ROUTED_CACHE_SETS = 4


class Routing:
    """Which adapter (or ``None``: the base model) each example of the batch goes through."""

    def __init__(self, names: Sequence[str | None]) -> None:
        self.names = list(names)
        self._groups: dict[torch.device, list[tuple[str | None, torch.Tensor]]] = {}
        self._slots: dict[tuple, torch.Tensor] = {}

    def groups(self, device: torch.device) -> list[tuple[str | None, torch.Tensor]]:
        """(name, row indices) per distinct name, in order of first appearance; built once per device."""
        if device not in self._groups:
            rows: dict[str | None, list[int]] = {}
            for i, name in enumerate(self.names):
                rows.setdefault(name, []).append(i)
            self._groups[device] = [(n, torch.tensor(r, device=device)) for n, r in rows.items()]
        return self._groups[device]

    def slots(self, order: list[str], device: torch.device) -> torch.Tensor:
        """For each example, its adapter's index in ``order``, or ``len(order)`` where it has none there."""
        key = (tuple(order), device)
        if key not in self._slots:  # built once per block, not at every layer of every forward
            where = {name: i for i, name in enumerate(order)}
            self._slots[key] = torch.tensor([where.get(n, len(order)) for n in self.names], device=device)
        return self._slots[key]

    def _check_batch(self, module_name: str, batch: int) -> None:
        if batch != len(self.names):
            raise ValueError(
                f"per_example_adapters was given {len(self.names)} adapter names but {module_name!r} received "
                f"a batch of {batch}; pass one name per example. Under beam search (num_beams=k) the batch "
                "is expanded k times: repeat each name k times, e.g. [n for n in names for _ in range(k)]."
            )

    # -- the two wrappers' forward while routed ------------------------------------------------------

    def layer_forward(self, layer: AdapterLayer, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        self._check_batch(layer.module_name, x.shape[0])
        present = [n for n, _ in self.groups(x.device) if n is not None and n in layer.adapters]
        if not present:
            return layer.base_layer(x, *args, **kwargs)
        adapters = [layer.adapters[n] for n in present]
        kind = type(adapters[0])
        if not args and not kwargs and all(type(a) is kind for a in adapters):
            out = kind.routed_output(
                adapters, self.slots(present, x.device), x, layer.base_layer, _routed_cache(layer, present)
            )
            if out is not None:
                return out
        return self._by_groups(x, args, kwargs, lambda name, *a, **k: _alone(layer, name, *a, **k))

    def copies_forward(self, wrapper: ModulesToSave, args: tuple, kwargs: dict) -> Any:
        if not args or not isinstance(args[0], torch.Tensor):
            raise TypeError(
                f"per_example_adapters routes {wrapper.module_name!r} by its first positional argument, "
                f"which must be the batch tensor; got {type(args[0]).__name__ if args else 'none'}"
            )
        x = args[0]
        self._check_batch(wrapper.module_name, x.shape[0])

        def run(name: str | None, *a: Any, **k: Any) -> Any:
            return (wrapper.copies[name] if name in wrapper.copies else wrapper.base_layer)(*a, **k)

        return self._by_groups(x, args[1:], kwargs, run)

    def _by_groups(self, x: torch.Tensor, args: tuple, kwargs: dict, run) -> torch.Tensor:
        """``run(name, rows, ...)`` for each group of rows; tensor arguments with the batch as their first
        dimension (e.g. a BERT output module's residual) are cut to the same rows."""
        groups = self.groups(x.device)
        if len(groups) == 1:
            return run(groups[0][0], x, *args, **kwargs)
        batch = x.shape[0]

        def cut(value: Any, rows: torch.Tensor) -> Any:
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
                return value.index_select(0, rows)
            return value

        out = None
        for name, rows in groups:
            part = run(
                name,
                x.index_select(0, rows),
                *(cut(a, rows) for a in args),
                **{k: cut(v, rows) for k, v in kwargs.items()},
            )
            if not isinstance(part, torch.Tensor):
                raise TypeError(
                    f"per_example_adapters can only split layers returning one tensor; got {type(part).__name__}"
                )
            if out is None:
                out = part.new_empty((batch, *part.shape[1:]))
            out.index_copy_(0, rows, part)
        return out


def _routed_cache(layer: AdapterLayer, present: list[str]) -> dict:
    caches = layer.__dict__.setdefault(ROUTED_CACHE_ATTR, {})  # insertion order: the oldest set first
    key = tuple(present)
    cache = caches.pop(key, None)
    if cache is None:
        cache = {}
        while len(caches) >= ROUTED_CACHE_SETS:
            del caches[next(iter(caches))]
    caches[key] = cache  # now the newest
    return cache


def _alone(layer: AdapterLayer, name: str | None, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The layer's output with only ``name`` active (none: the base), the routing set aside."""
    active, routing = layer.active, layer.__dict__.get(ROUTING_ATTR)
    layer.active = [name] if name in layer.adapters else []
    layer.__dict__[ROUTING_ATTR] = None
    try:
        return layer.forward(x, *args, **kwargs)
    finally:
        layer.active = active
        layer.__dict__[ROUTING_ATTR] = routing


def check_names(model: nn.Module, names: Sequence[str | None]) -> list[str | None]:
    """Validate ``names`` for ``model``; raises naming what is wrong and the fix."""
    state = state_of(model)
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(
            f"per_example_adapters needs a list with one adapter name (or None) per example, got "
            f"{type(names).__name__}; for one adapter on the whole batch use set_active(model, name)"
        )
    names = list(names)
    if not names:
        raise ValueError(
            "per_example_adapters got an empty list of names; pass one name (or None) per example"
        )
    unknown = sorted({repr(n) for n in names if n is not None and n not in state.configs})
    if unknown:
        raise AdapterNameError(
            f"per_example_adapters: no adapter named {', '.join(unknown)}; adapters on this model: "
            f"{sorted(state.configs)} (None routes an example through the base model)"
        )
    if model.training:
        raise RuntimeError(
            "per_example_adapters is for inference and the model is in training mode (dropout would "
            "differ per group); call model.eval() first"
        )
    merged = sorted({n for _, layer in adapter_layers(model) for n in layer.merged})
    if merged:
        raise AdapterNameError(
            f"per_example_adapters needs unmerged adapters, but {merged} are merged into the base weights, "
            f"which every example would then see; call peftkit.unmerge(model) first"
        )
    unroutable: dict[str, list[str]] = {}  # reason -> adapter names
    for _, layer in adapter_layers(model):
        for n, adapter in layer.adapters.items():
            if n in names and adapter.unroutable and n not in unroutable.setdefault(adapter.unroutable, []):
                unroutable[adapter.unroutable].append(n)
    for reason, refused in unroutable.items():
        if refused:
            raise AdapterNameError(
                f"per_example_adapters cannot route adapter(s) {sorted(refused)}: {reason}; run them in "
                "separate batches"
            )
    parts = model_parts(model)
    whole = sorted({n for n in names if n in parts and not parts[n].mergeable})
    if whole:
        raise AdapterNameError(
            f"per_example_adapters cannot route adapter(s) {whole}: they change the model as a whole (e.g. a "
            "soft prompt prepended to every input) rather than layer by layer; run them in separate batches"
        )
    return names


@contextlib.contextmanager
def per_example_adapters(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Within the block, example ``i`` of every batch goes through adapter ``names[i]`` alone.

    See :func:`peftkit.per_example_adapters` for the full contract.
    """
    routing = Routing(check_names(model, names))
    wrappers = [w for _, w in adapter_layers(model)] + [w for _, w in saved_modules(model)]
    previous = [w.__dict__.get(ROUTING_ATTR) for w in wrappers]  # nested blocks restore the outer one
    for wrapper in wrappers:
        wrapper.__dict__[ROUTING_ATTR] = routing
    try:
        yield model
    finally:
        for wrapper, before in zip(wrappers, previous):
            wrapper.__dict__[ROUTING_ATTR] = before


class Router:
    """:func:`per_example_adapters` for a model that routes batch after batch (a server routes every decode
    step): the wrappers are found and every adapter's routability checked once, and again only when the
    model's set of adapters changes, instead of walking the whole model for each batch.

    Merging or unmerging adapters while a router is in use is not seen (it is checked with the adapter
    set); servers never merge.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._key: tuple[str, ...] | None = None
        self._wrappers: list[nn.Module] = []
        self._refused: dict[str, str] = {}  # adapter name -> why it cannot be routed

    def _refresh(self) -> None:
        state = state_of(self.model)
        key = tuple(state.configs)
        if key == self._key:
            return
        self._wrappers = [w for _, w in adapter_layers(self.model)] + [
            w for _, w in saved_modules(self.model)
        ]
        self._refused = {}
        for name in key:
            try:
                check_names(self.model, [name])
            except (AdapterNameError, ValueError) as exc:
                self._refused[name] = str(exc)
        self._key = key

    @contextlib.contextmanager
    def route(self, names: Sequence[str | None]) -> Iterator[nn.Module]:
        """Within the block, example ``i`` goes through adapter ``names[i]`` alone (None: the base)."""
        if self.model.training:
            raise RuntimeError(
                "routing is for inference and the model is in training mode; call model.eval() first"
            )
        self._refresh()
        names = list(names)
        unknown = sorted({repr(n) for n in names if n is not None and n not in self._key})  # type: ignore[operator]
        if unknown or not names:
            raise AdapterNameError(
                f"no adapter named {', '.join(unknown)} on this model" if unknown else "route() got no names"
            )
        refused = sorted({n for n in names if n in self._refused})
        if refused:
            raise AdapterNameError(self._refused[refused[0]])
        routing = Routing(names)
        previous = [w.__dict__.get(ROUTING_ATTR) for w in self._wrappers]
        for wrapper in self._wrappers:
            wrapper.__dict__[ROUTING_ATTR] = routing
        try:
            yield self.model
        finally:
            for wrapper, before in zip(self._wrappers, previous):
                wrapper.__dict__[ROUTING_ATTR] = before

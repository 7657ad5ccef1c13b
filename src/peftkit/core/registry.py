"""Where methods and layer kinds add themselves.

A method file calls :func:`register_method` on its config class and :func:`register_layer` once per
kind of base layer it can wrap. Dispatch is a first-match table per method (STYLE.md rule 5): a
quantized backend adds its own rows in front with ``first=True`` from an import-guarded module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

# What a run config's ``adapter.method`` is when it names none (and what ``peftkit inspect`` prices
# candidate targets with). The one place the default method is named outside its own file.
DEFAULT_METHOD = "lora"
# The ``adapter.method`` that trains every parameter instead of an adapter: not a registered method,
# the baseline methods are compared with.
FULL_FINE_TUNING = "full"

Predicate = Callable[[nn.Module], "str | None"]
"""Returns None when the module is supported, else a short reason why it is not."""


@dataclass
class LayerRow:
    """One row of a method's dispatch table."""

    kind: str  # human name shown in summaries and errors, e.g. "Linear"
    base_types: tuple[type, ...]
    build: Callable[..., nn.Module]  # (base_layer, **plain values) -> per-adapter module
    check: Predicate | None = None  # extra configuration check on a module of a matching type


ParameterCheck = Callable[[nn.Module, str, nn.Parameter], "str | None"]
"""(module, parameter name, parameter) -> None when the parameter can be adapted, else why not."""


@dataclass
class ParameterRow:
    """How a method adapts ``nn.Parameter`` targets (the reference library's ``target_parameters``): one
    adapter module per owning module, covering every targeted parameter of it."""

    kind: str  # human name, e.g. "Parameter (2-D or 3-D)"
    build: Callable[..., nn.Module]  # (owning module, **plain values) -> per-adapter module
    check: ParameterCheck | None = None


@dataclass
class MethodSpec:
    peft_type: str
    config_cls: type
    rows: list[LayerRow] = field(default_factory=list)
    parameter_rows: list[ParameterRow] = field(default_factory=list)


_METHODS: dict[str, MethodSpec] = {}
_BUILTINS_LOADED = False
_BACKENDS_IMPORTED = False
# Top-level package of a layer type (e.g. "bitsandbytes") -> the function that registers its rows.
# Called on the first dispatch of such a layer, so `import peftkit` never pays for the package.
_BACKENDS: dict[str, Callable[[], None]] = {}


@dataclass
class BaseAccess:
    """How the core reads and writes the tensors of a base layer that does not store them densely
    (a quantized layer): merges go through it instead of ``getattr(layer, "weight")``.

    ``read(layer, name)`` returns a dense float copy; ``write(layer, name, dense)`` stores ``dense``
    in the layer's own format and returns the error that storing introduced ({"max_abs", "relative"},
    or None when exact); ``dense(layer)`` returns an equivalent plain module (e.g. ``nn.Linear``).
    ``shape(layer)`` is the dense weight's shape (adapter fingerprints use it). ``snapshot(layer)`` /
    ``restore(layer, snap)`` keep and put back the stored weight as it was before
    the first merge, so unmerging everything gives the base back bit for bit instead of re-quantized.
    """

    base_types: tuple[type, ...]
    read: Callable[[nn.Module, str], Any]
    write: Callable[[nn.Module, str, Any], dict[str, float] | None]
    dense: Callable[[nn.Module], nn.Module]
    snapshot: Callable[[nn.Module], Any]
    restore: Callable[[nn.Module, Any], None]
    shape: Callable[[nn.Module], tuple[int, ...]] | None = None  # the dense weight's shape
    # puts the layer in a state that back-propagates (prepare_for_kbit_training calls it)
    trainable: Callable[[nn.Module], None] | None = None


_ACCESS: list[BaseAccess] = []


def _load_builtin_methods() -> None:
    # `import peftkit` is lazy (so `peftkit --help` stays fast), so the built-in methods may not have
    # registered themselves yet when a lookup comes; importing the package registers them all.
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        import importlib

        importlib.import_module("peftkit.methods")


def register_backend(package: str, load: Callable[[], None]) -> None:
    """Declare that layers whose type comes from the top-level package ``package`` get their dispatch
    rows (and :class:`BaseAccess`) from ``load()``, called once, when such a layer is first dispatched.

    A layer of that package existing means the package is already imported, so registering then costs
    nothing extra, while ``import peftkit`` alone never imports it.
    """
    _BACKENDS[package] = load


def _ensure_backends() -> None:
    global _BACKENDS_IMPORTED
    if not _BACKENDS_IMPORTED:
        _BACKENDS_IMPORTED = True
        import importlib

        importlib.import_module("peftkit.backends")


def load_backend(package: str) -> None:
    """Register the backend declared for ``package`` now, if it has not been registered yet."""
    _ensure_backends()
    load = _BACKENDS.pop(package, None)
    if load is not None:
        load()


def load_backend_for(module: nn.Module) -> None:
    """Register the backend for ``module``'s package, if one is declared and not registered yet."""
    _ensure_backends()
    for cls in type(module).__mro__:
        if _BACKENDS:
            load_backend(cls.__module__.partition(".")[0])


def register_base_access(access: BaseAccess) -> None:
    """Add how to read/write/densify the tensors of ``access.base_types`` (checked before older entries)."""
    _ACCESS.insert(0, access)


def base_access(module: nn.Module) -> BaseAccess | None:
    """The :class:`BaseAccess` for ``module``, or None for a layer that stores its tensors densely."""
    load_backend_for(module)
    return next((a for a in _ACCESS if isinstance(module, a.base_types)), None)


# Round-trip quantizers by number of bits (4: NF4, 8: LLM.int8()): a dense float weight (out x in) ->
# the weight its quantized copy dequantizes to. Backends register them; inits that must see what a
# quantized base will hold (LoRA's LoftQ) look them up without importing a quantization library.
_QUANTIZERS: dict[int, Callable[[Any], Any]] = {}


def register_quantizer(bits: int, roundtrip: Callable[[Any], Any]) -> None:
    """Make ``roundtrip(weight) -> dequantized(quantized(weight))`` the ``bits``-bit quantizer."""
    _QUANTIZERS[bits] = roundtrip


def quantizer(bits: int) -> Callable[[Any], Any] | None:
    """The ``bits``-bit round-trip quantizer a backend registered, or None (no backend installed)."""
    _ensure_backends()
    return _QUANTIZERS.get(bits)


def register_method(peft_type: str) -> Callable[[type], type]:
    """Class decorator for a method's config dataclass; ``peft_type`` is the interchange name (e.g. "LORA")."""

    def decorate(config_cls: type) -> type:
        spec = _METHODS.get(peft_type)
        if spec is None:
            _METHODS[peft_type] = MethodSpec(peft_type, config_cls)
        else:
            spec.config_cls = config_cls
        config_cls.peft_type = peft_type
        return config_cls

    return decorate


def register_layer(
    peft_type: str,
    kind: str,
    base_types: tuple[type, ...],
    build: Callable[..., nn.Module],
    check: Predicate | None = None,
    first: bool = False,
) -> None:
    """Add a dispatch row: modules of ``base_types`` (passing ``check``) are adapted by ``build``."""
    spec = _METHODS.setdefault(peft_type, MethodSpec(peft_type, object))
    row = LayerRow(kind, base_types, build, check)
    if first:
        spec.rows.insert(0, row)
    else:
        spec.rows.append(row)


def register_parameter(
    peft_type: str, kind: str, build: Callable[..., nn.Module], check: ParameterCheck | None = None
) -> None:
    """Declare that ``peft_type`` adapts parameters named by ``target_parameters``: ``build(module,
    **values)`` makes the adapter for the module owning them, ``check`` refuses a parameter it cannot take."""
    spec = _METHODS.setdefault(peft_type, MethodSpec(peft_type, object))
    spec.parameter_rows.append(ParameterRow(kind, build, check))


def adapts_parameters(peft_type: str) -> bool:
    """Whether ``peft_type`` registered a way to adapt parameters (``register_parameter``)."""
    return bool(method(peft_type).parameter_rows)


def dispatch_parameter(
    peft_type: str, module: nn.Module, name: str, param: nn.Parameter
) -> tuple[ParameterRow | None, str | None]:
    """First parameter row accepting ``module``'s parameter ``name``, or (None, why not)."""
    rows = method(peft_type).parameter_rows
    if not rows:
        return None, f"{peft_type} adapts modules, not parameters (no target_parameters support)"
    reason = None
    for row in rows:
        reason = row.check(module, name, param) if row.check else None
        if reason is None:
            return row, None
    return None, reason


def method(peft_type: str) -> MethodSpec:
    if peft_type not in _METHODS:
        _load_builtin_methods()
    try:
        return _METHODS[peft_type]
    except KeyError:
        known = ", ".join(sorted(_METHODS)) or "none"
        raise KeyError(f"no PEFT method registered as {peft_type!r}; registered: {known}") from None


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def find_method(name: str) -> MethodSpec:
    """The method called ``name``, spelled as its interchange type in any case, with or without
    ``-``/``_`` ("lora", "LORA", "prefix-tuning", "ln_tuning" ...)."""
    _load_builtin_methods()
    by_key = {_key(t): spec for t, spec in _METHODS.items()}
    spec = by_key.get(_key(name)) if isinstance(name, str) else None
    if spec is None:
        import difflib

        close = difflib.get_close_matches(_key(str(name)), list(by_key), n=1)
        hint = f"; did you mean {by_key[close[0]].peft_type.lower()!r}?" if close else ""
        known = ", ".join(t.lower() for t in sorted(_METHODS))
        raise KeyError(f"unknown PEFT method {name!r}{hint} Known methods: {known}")
    return spec


def registered_methods() -> list[str]:
    _load_builtin_methods()
    return sorted(_METHODS)


def methods_with(capability: str) -> list[str]:
    """The registered methods (lower-case names, sorted) whose config class declares ``capability``
    (an ``AdapterConfig`` class attribute such as ``"quantizable"``) true."""
    _load_builtin_methods()
    return sorted(t.lower() for t, spec in _METHODS.items() if getattr(spec.config_cls, capability, False))


def dispatch(peft_type: str, module: nn.Module) -> tuple[LayerRow | None, str | None]:
    """First matching row for ``module``, or (None, reason) explaining why it cannot be adapted."""
    load_backend_for(module)
    reason = None
    for row in method(peft_type).rows:
        if isinstance(module, row.base_types):
            problem = row.check(module) if row.check else None
            if problem is None:
                return row, None
            reason = problem
    if reason is None:
        reason = f"type {type(module).__name__} is not supported"  # the caller lists what is
    return None, reason


def has_row_for(peft_type: str, module: nn.Module) -> bool:
    """Whether some dispatch row of ``peft_type`` is for ``module``'s type (whatever its checks say)."""
    load_backend_for(module)
    return any(isinstance(module, row.base_types) for row in method(peft_type).rows)


def supported_kinds(peft_type: str) -> str:
    """The layer types ``peft_type`` adapts, for messages. A type that subclasses another one listed
    (a quantized ``Linear4bit`` is an ``nn.Linear``) is left out: the list names the general kinds, the
    same whether or not a backend has registered its rows yet."""
    seen: list[str] = []
    types = [t for row in method(peft_type).rows for t in row.base_types]
    for row in method(peft_type).rows:
        for t in row.base_types:
            if any(t is not other and issubclass(t, other) for other in types):
                continue
            label = f"{t.__module__.split('.')[0]}.{t.__qualname__}" if t.__module__ else t.__qualname__
            label = label.replace("torch.", "torch.nn.", 1) if label.startswith("torch.") else label
            if label not in seen:
                seen.append(label)
    return ", ".join(seen)


def config_class(peft_type: str) -> Any:
    return method(peft_type).config_cls


# -- optimizers a method brings -------------------------------------------------------------------------

OptimizerBuilder = Callable[..., Any]
"""``(model, lr, weight_decay) -> torch.optim.Optimizer``: an optimizer over the model's trainable
parameters that a method trains its adapters with (LoRA-FA's), chosen by name (``train.optimizer``)."""

# The optimizer a run gets when it names none: AdamW, built by the training loop itself.
DEFAULT_OPTIMIZER = "adamw"
_OPTIMIZERS: dict[str, OptimizerBuilder] = {}


def register_optimizer(name: str, build: OptimizerBuilder) -> None:
    """Make the optimizer ``build`` available as ``name`` (``train.optimizer: <name>``)."""
    if name == DEFAULT_OPTIMIZER:
        raise ValueError(
            f"{name!r} is the training loop's own AdamW; register the optimizer under another name"
        )
    _OPTIMIZERS[name] = build


def optimizer_builder(name: str) -> OptimizerBuilder | None:
    """The builder registered as ``name``, or None."""
    _load_builtin_methods()
    return _OPTIMIZERS.get(name)


def registered_optimizers() -> list[str]:
    """Every optimizer a run can name: the default AdamW and those methods registered."""
    _load_builtin_methods()
    return [DEFAULT_OPTIMIZER, *sorted(_OPTIMIZERS)]

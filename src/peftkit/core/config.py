"""The base config every method's config extends: what to adapt, and how the saved file looks.

Field names follow the reference library's ``adapter_config.json`` so that a config round-trips
through the interchange format without renaming.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import ConfigError
from . import registry

ALL_LINEAR = "all-linear"

# Keys every reference adapter_config.json may carry that describe nothing peftkit must act on.
_BOOKKEEPING_KEYS = {"peft_type", "peft_version", "auto_mapping"}


ANY = ...  # in reference_inert: the key is ignored whatever its value


def _is_inert(value: Any, inert: Any) -> bool:
    if inert is ANY:
        return True
    empty = (None, False, {}, [], "")
    return value == inert or (value in empty and inert in empty)


@dataclass
class AdapterConfig:
    """Targets and bookkeeping shared by every method.

    Attributes:
        target_modules: Which modules to adapt. A list matches a module whose full name equals an entry
            or ends with ``"." + entry`` (the reference library's rule); a string is a regular
            expression that must match the full name; ``"all-linear"`` picks every linear layer except
            the model's output head. ``None`` lets the method pick its default: the reference library's
            for the model_type where it has one, else the layers in the method's roles found by
            structure (docs/targets.md).
        exclude_modules: Same matching rules; a module matched here is never adapted.
        layers_to_transform: Only adapt modules inside these layer indices (the number after
            ``layers_pattern`` in the module name, e.g. ``encoder.layer.3.``).
        layers_pattern: Name(s) of the module list holding the layers, e.g. ``"layer"`` or ``"h"``.
        rank_pattern: Per-module rank overrides, keyed by a regex matched against the name's end.
        alpha_pattern: Per-module alpha overrides, same matching.
        modules_to_save: Modules (e.g. a freshly initialised classifier head) to train in full; a
            trainable copy is made per adapter and saved with it.
        task_type: The reference library's task name, e.g. ``"SEQ_CLS"`` or ``"CAUSAL_LM"``.
        base_model_name_or_path: Where the base model came from; recorded on save.
        inference_mode: True once saved; loading with ``is_trainable=False`` keeps the adapter frozen.
    """

    peft_type: ClassVar[str] = ""
    # Keys the reference library writes for this method that peftkit does not implement, with the
    # value meaning "feature off". Loading a file that turns one of them on is refused.
    reference_inert: ClassVar[dict[str, Any]] = {}
    # False for methods that change the model as a whole (soft prompts) instead of wrapping layers:
    # target_modules is then not resolved and no layer is wrapped.
    wraps_layers: ClassVar[bool] = True
    # Shared fields the reference library's config for this method does not have: to_dict leaves them
    # out while unset, so the reference reads the file without unknown-key warnings.
    fields_not_in_format: ClassVar[tuple[str, ...]] = ()
    # Prefix of the saved keys of module tensors (layer adapters, modules_to_save copies, extra base
    # parameters). The reference library writes "base_model." instead for methods that leave every module
    # of the model in place (soft prompts), so their classifier copy is "base_model.classifier.weight".
    state_key_prefix: ClassVar[str] = "base_model.model."
    # Learning rates `peftkit compare` tries for this method when its `compare.tune` names none: three
    # points a factor ~3 apart around where the method's published runs train. Methods with few
    # parameters and no rank (IA3, soft prompts) train at far higher rates than LoRA; see docs/compare.md.
    lr_candidates: ClassVar[tuple[float, ...]] = (3e-4, 1e-3, 3e-3)
    # One line for docs/methods.md: when a practitioner would pick this method ("you want ...").
    pick_when: ClassVar[str] = ""
    # What target_modules=None adapts on an architecture the method's ``default_targets`` table (the
    # reference library's, by model_type) lacks: the modules in these roles of core/anatomy.py, found
    # by structure. Each role must be found, except the optional ones.
    target_roles: ClassVar[tuple[str, ...]] = ()
    optional_roles: ClassVar[tuple[str, ...]] = ()
    # Model types whose ``default_targets`` entry is peftkit's own addition, not the reference library's.
    own_default_types: ClassVar[tuple[str, ...]] = ()

    # -- capabilities: what rules outside methods/ ask a method, instead of testing its name ------------
    # Trains on a base whose linear layers are quantized (model.quantize): a backend has quantized rows
    # for its layers (backends/), or it wraps no linear layer (soft prompts, norms). Without it, a run
    # config that quantizes the base is refused before anything loads.
    quantizable: ClassVar[bool] = False
    # peftkit.select can choose its targets and per-module ranks (``adapter.target_modules: auto``) and
    # start its adapters along the probe's input directions (``select.init_from``).
    selectable: ClassVar[bool] = False
    # How reports name the method ("LoRA"); empty: its interchange name, peft_type.
    display_name: ClassVar[str] = ""
    # Trains the embedding rows of chosen tokens (``with_trained_tokens``): a run's data.add_special_tokens
    # needs it, or the new tokens' rows would stay as initialised.
    trains_tokens: ClassVar[bool] = False

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        # The reference writes null for an unset per-module pattern (rank_pattern, n_frequency_pattern ...):
        # every method reads it as empty, so it is normalised here once.
        for f in dataclasses.fields(self):
            if f.name.endswith("_pattern") and f.default_factory is dict and getattr(self, f.name) is None:
                setattr(self, f.name, {})
        if isinstance(self.target_modules, str) and self.target_modules.lower() == ALL_LINEAR:
            self.target_modules = ALL_LINEAR
        for name in ("target_modules", "exclude_modules", "modules_to_save", "layers_pattern"):
            value = getattr(self, name)
            if isinstance(value, (tuple, set)):
                setattr(self, name, sorted(value) if isinstance(value, set) else list(value))
        problems = self.problems()
        if problems:
            raise ConfigError(problems, what=type(self).__name__)

    def problems(self) -> list[str]:
        """Every problem with this config; subclasses extend the list."""
        out: list[str] = []
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, str):
                if value != ALL_LINEAR or name == "exclude_modules":
                    try:
                        re.compile(value)
                    except re.error as exc:
                        out.append(f"{name}: {value!r} is not a valid regular expression ({exc})")
            elif isinstance(value, list):
                # [] is how the reference library says "no modules, only target_parameters"
                if not value and not (name == "target_modules" and self.parameter_targets()):
                    out.append(f"{name}: empty list; give at least one module name, or None")
                if not all(isinstance(v, str) and v for v in value):
                    out.append(f"{name}: every entry must be a non-empty string, got {value!r}")
            else:
                out.append(f"{name}: expected a list of names or a regex string, got {type(value).__name__}")
        ltt = self.layers_to_transform
        if ltt is not None:
            items = [ltt] if isinstance(ltt, int) else ltt
            if not isinstance(items, list) or not all(isinstance(i, int) and i >= 0 for i in items):
                out.append(f"layers_to_transform: expected a non-negative int or list of them, got {ltt!r}")
        if ltt not in (None, []) and isinstance(self.target_modules, str):
            out.append(
                "layers_to_transform: works with a list of target_modules, not a regex or 'all-linear' (the "
                "reference library refuses the combination); put the layer numbers into the regex instead"
            )
        if self.layers_pattern not in (None, [], "") and ltt in (None, []):
            out.append("layers_pattern: only meaningful with layers_to_transform; set both or neither")
        for name in ("rank_pattern", "alpha_pattern"):
            pattern = getattr(self, name)
            if not isinstance(pattern, dict):
                out.append(f"{name}: expected a dict of regex -> number, got {type(pattern).__name__}")
                continue
            for key, val in pattern.items():
                try:
                    re.compile(key)
                except re.error as exc:
                    out.append(f"{name}: key {key!r} is not a valid regular expression ({exc})")
                if not isinstance(val, (int, float)) or isinstance(val, bool) or val <= 0:
                    out.append(f"{name}[{key!r}]: must be a positive number, got {val!r}")
        if self.modules_to_save is not None and not all(
            isinstance(m, str) and m for m in self.modules_to_save
        ):
            out.append(
                f"modules_to_save: every entry must be a non-empty string, got {self.modules_to_save!r}"
            )
        return out

    # -- hooks a method implements -----------------------------------------------------------------

    def parameter_targets(self) -> list[str] | None:
        """Names of ``nn.Parameter`` tensors to adapt directly (the reference library's LoRA field
        ``target_parameters``: full names or ``.``-suffixes, e.g. ``"mlp.experts.gate_up_proj"``), for a
        method that registered a parameter row (``registry.register_parameter``); None by default."""
        return None

    @classmethod
    def for_targets(cls, target_modules: list[str] | str) -> AdapterConfig:
        """The method's default config on ``target_modules``: what ``peftkit inspect`` prices a candidate
        target set with. A method whose defaults cannot stand alone overrides it."""
        return cls(target_modules=target_modules)

    def size_label(self) -> str:
        """The method and its size as reports print them, e.g. "LoRA r=8" (the rank where it has one)."""
        name = self.display_name or self.peft_type
        rank = getattr(self, "r", None)
        return f"{name} r={rank}" if isinstance(rank, int) and not isinstance(rank, bool) else name

    def layer_values(self, target: Any) -> dict[str, Any]:
        """Plain keyword values for the method's layer builder, for one resolved target."""
        raise NotImplementedError(f"{type(self).__name__} must implement layer_values()")

    def with_trained_tokens(self, indices: list[int], layers: list[str]) -> AdapterConfig:
        """This config also training the rows of ``indices`` in each of ``layers`` (full module names: the
        input embedding, then the output head when it is not tied to it), for methods that declare
        ``trains_tokens``; the token ids it already lists are kept."""
        raise NotImplementedError(f"{type(self).__name__} does not train token rows (trains_tokens is False)")

    def extra_targets(self, model: Any, plan: Any) -> list[Any]:
        """Targets beyond what ``target_modules`` selects (``targeting.Target`` with its own ``values``,
        maybe ``follows`` another), appended to ``plan.targets``: LoRA's ``trainable_token_indices``
        embeddings, the modules sharing a trained embedding's weight. None by default."""
        return []

    def after_resolve(self, plan: Any) -> AdapterConfig:
        """The config to record once targets are known (e.g. facts about the layers that were found)."""
        return self

    def fresh_start_warnings(self, model: Any, adapter_name: str) -> list[str]:
        """Warnings about where a freshly injected adapter ``adapter_name`` starts training from, shown by
        ``peftkit.inject`` (a run's too); loading saved tensors replaces the start, so loading does not ask.
        None by default."""
        return []

    def portable(self) -> AdapterConfig:
        """The config matching ``interchange_state(portable=True)`` tensors (unchanged by default)."""
        return self

    def default_target_spec(self, model: Any) -> list[str] | str | None:
        """What ``target_modules=None`` selects when that depends on the model itself rather than on its
        model_type (e.g. every module holding a bias); None uses ``default_targets`` by model_type, then
        ``default_roles`` found by structure."""
        return None

    def table_source(self, model_type: str) -> str:
        """Where the ``default_targets`` entry for ``model_type`` comes from, as reports say it."""
        whose = "peftkit" if model_type in self.own_default_types else "reference"
        return f"{whose} default for {model_type}"

    def default_roles(self) -> tuple[str, ...]:
        """The roles (``core/anatomy.py``) whose modules ``target_modules=None`` adapts on an architecture
        without a ``default_targets`` entry; ``target_roles`` unless a field changes them."""
        return self.target_roles

    def extra_trainable(self, model: Any, adapted: list[str]) -> list[str]:
        """Names of base-model parameters this adapter also trains and saves (none by default)."""
        return []

    def needs_init_data(self) -> bool:
        """Whether :meth:`init_from_data` must run on training batches before ``inject`` (LoRA-GA's
        gradients); False by default."""
        return False

    def init_from_data(self, model: Any, train_step: Any) -> None:
        """Prepare ``model`` for this config's init with ``train_step`` (forward and backward passes of the
        training loss on a few batches), before ``inject``. Nothing by default."""

    def export_portable(self) -> bool:
        """Whether a run exports this adapter with ``portable=True``: its init rewrote the base in a way
        loading the files cannot redo (LoRA-GA: the gradients are gone). False by default."""
        return False

    def saves_portable(self) -> bool:
        """Whether saved files always take the :meth:`portable` form: the init rewrote the base weights in a
        way no reader can repeat from the file alone (CorDA's decomposition needs the data)."""
        return False

    def needs_data(self) -> bool:
        """Whether the adapter starts from the model's activations on a few batches (LoRA's EVA and CorDA
        inits): it is then injected by :meth:`inject_from_data`, not ``inject``."""
        return False

    def inject_from_data(
        self, model: Any, batches: list[Any], forward: Any, adapter_name: str = "default"
    ) -> dict[str, Any]:
        """Inject into ``model`` starting from ``forward(model, batch)`` over ``batches``; facts for a report."""
        raise NotImplementedError(f"{type(self).__name__} does not start from data")

    def training_hook(self, model: Any, adapter_name: str, total_steps: int) -> Any:
        """An object a training loop drives each step (AdaLoRA's rank allocation), or None.

        Protocol: ``loss_penalty()`` returns a scalar added to every loss, and
        ``after_optimizer_step(step)`` runs after optimizer step ``step`` (1-based), while the
        gradients are still there. ``peftkit.train.fit`` does both; a hand-written loop calls them."""
        return None

    def param_groups(
        self, model: Any, lr: float, lr_ratio: float, weight_decay: float = 0.0
    ) -> list[dict[str, Any]] | None:
        """Optimizer groups for ``model`` when a run gives this method's parameters their own learning
        rates (``train.lora_plus_ratio``: LoRA+), or None when the method has no such groups (the default).

        The groups (``{"params", "lr", "weight_decay", "name"}``) cover every trainable parameter of the
        whole model, those of other adapters and the rest included, each exactly once: the training loop
        hands them to the optimizer as they are (after splitting off the parameters weight decay skips)."""
        return None

    def build_part(self, model: Any, plan: Any) -> Any:
        """A :class:`~peftkit.core.layer.ModelPart` holding model-level adapter state, or None.

        Built before the layers; when there is one, each layer builder also receives it as ``part=``
        (e.g. VeRA's shared projections)."""
        return None

    # -- interchange -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The config as the reference library writes it (``adapter_config.json``)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        inert = {k: v for k, v in self.reference_inert.items() if v is not ANY}
        data = {**inert, **_jsonable(data), "peft_type": self.peft_type}
        for name in self.fields_not_in_format:
            if data.get(name) in (None, {}, [], ""):
                data.pop(name, None)
        return dict(sorted(data.items()))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        """Build the registered config class named by ``data["peft_type"]`` (or ``cls``).

        Unknown keys (written by a newer version) warn and are ignored; a reference-library feature
        peftkit does not implement, switched on, is an error rather than a silently different model.
        """
        data = dict(data)
        peft_type = data.get("peft_type") or cls.peft_type
        target_cls = registry.config_class(peft_type) if peft_type else cls
        data = target_cls.normalise_reference(data)
        names = {f.name for f in dataclasses.fields(target_cls)}
        kwargs, unknown, unsupported = {}, [], []
        for key, value in data.items():
            if key in names:
                kwargs[key] = value
            elif key in target_cls.reference_inert:
                if not _is_inert(value, target_cls.reference_inert[key]):
                    unsupported.append(
                        f"{key}={value!r} is a reference-library feature peftkit does not implement"
                    )
            elif key not in _BOOKKEEPING_KEYS:
                unknown.append(key)
        if unsupported:
            raise ConfigError(unsupported, what=f"{peft_type} adapter config")
        if unknown:
            warnings.warn(
                f"ignoring unknown {peft_type} config keys {sorted(unknown)} (written by a newer version?)",
                stacklevel=2,
            )
        return target_cls(**kwargs)

    @classmethod
    def normalise_reference(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Rewrite reference-library values that mean the same to peftkit once saved (none by default)."""
        return data

    def matching_tensors(self, tensors: dict[str, Any]) -> AdapterConfig:
        """The config that the saved ``tensors`` (interchange keys) were written with, where a reference
        file's config does not say it all (BOFT: the reference ignores its butterfly factor without its
        CUDA extension). Called by ``load_adapter`` before injecting; unchanged by default."""
        return self

    def replace(self, **changes: Any) -> AdapterConfig:
        return dataclasses.replace(self, **changes)


def no_patterns_problems(config: AdapterConfig, method: str, why: str, fix: str) -> list[str]:
    """Problems for a method whose format has no per-module rank or alpha, when ``rank_pattern`` or
    ``alpha_pattern`` is set: each names the field, ``why`` the method has none, and the ``fix``."""
    return [
        f"{name}: {method} has no per-module rank or alpha ({why}); {fix.format(name=name)}"
        for name in ("rank_pattern", "alpha_pattern")
        if getattr(config, name, None)
    ]


def with_layout_of(config: Any, plan: Any, conv1d_type: Any) -> Any:
    """``config`` with ``fan_in_fan_out`` true exactly when the planned targets are GPT-2 ``Conv1D`` layers:
    what readers of the interchange format expect (the reference library warns and flips it otherwise)."""
    conv1d = bool(conv1d_type) and any(isinstance(t.module, conv1d_type) for t in plan.targets)
    return config if conv1d == config.fan_in_fan_out else config.replace(fan_in_fan_out=conv1d)


def _jsonable(data: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, (set, tuple)):
            value = list(value)
        out[key] = value
    return out

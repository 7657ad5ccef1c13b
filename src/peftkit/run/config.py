"""Load a YAML run config (plus ``dotted.key=value`` overrides) into a checked :class:`RunConfig`.

Every key is checked against the dataclasses in ``run/schema.py`` and ``train/config.py``: an unknown
key (with the closest valid name), a value of the wrong type, an out-of-range value, an unknown task,
method, bundled model or data set, and a missing file are all collected and raised together as one
:class:`~peftkit.errors.ConfigError`, each problem headed by its field path (``train.lr: ...``). The
``adapter`` section is checked against the chosen method's own config class through
:func:`peftkit.make_config`.

:func:`dump_config` writes the resolved config (every default filled in, local paths made absolute)
back to YAML; a run keeps it as ``config.yaml`` in its directory, so ``peftkit eval RUN_DIR`` can
rebuild the run from anywhere.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from ..data.config import DataConfig
from ..errors import ConfigError
from ..models.config import ModelConfig
from ..tasks.config import EvalConfig
from ..train.config import REPORT_TO, TrainConfig, lower_is_better
from .schema import RunConfig

FULL_FINE_TUNING = "full"  # `adapter.method: full` trains every parameter instead of an adapter
# Learning rates `peftkit compare` tries for full fine-tuning (a method's own live on its config class,
# ``lr_candidates``): published BERT-size runs use 1e-5 to 5e-5 over epochs; short budgets need more.
FULL_FINE_TUNING_LR_CANDIDATES = (3e-5, 1e-4, 3e-4)
AUTO = "auto"  # `adapter.target_modules: auto`: targets and ranks chosen by peftkit.select before training
SPLITS = ("train", "validation", "test")
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; configs expect it to be the number 0.001."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """``text`` as YAML, with ``1e-3``-style numbers read as floats."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


# -- loading ---------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> RunConfig:
    """Read the YAML file ``path``, apply ``overrides`` and return the checked run config.

    Args:
        path: A YAML file whose top-level keys are the sections of :class:`RunConfig`.
        overrides: ``dotted.key=value`` strings applied on top of the file, e.g. ``train.lr=1e-3``,
            ``adapter.target_modules=[query,value]``; values are read as YAML.

    Raises:
        ConfigError: the file is missing or not YAML, or any field is wrong (every problem is listed).
    """
    path = Path(path)
    if not path.is_file():
        why = "is a directory, not a YAML file" if path.is_dir() else "does not exist"
        raise ConfigError(
            [
                f"config file {str(path)!r} {why} (relative paths start from {str(Path.cwd())!r}); "
                "give the path of a YAML run config, e.g. one of configs/*.yaml"
            ],
            what="run config",
        )
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {exc}"], what="run config") from None
    return parse_config({} if data is None else data, overrides, source=str(path))


def parse_config(data: Any, overrides: Iterable[str] = (), source: str = "config") -> RunConfig:
    """Check the mapping ``data`` (a parsed YAML document) with ``overrides`` applied.

    Raises:
        ConfigError: every problem found, each headed by its field path.
    """
    problems: list[str] = []
    if not isinstance(data, Mapping):
        raise ConfigError(
            [
                f"{source}: the top level must be a mapping of sections (task, model, data, adapter, train, "
                f"eval, output_dir), got {_show(data)}"
            ],
            what="run config",
        )
    try:
        # the older spelling moves into its section twice: from the file, then from the overrides, so an
        # override (on either spelling) is the newest word on the length
        data = apply_overrides(_moved_max_new_tokens(data, problems), overrides, problems)
        data = _moved_max_new_tokens(data, problems, overriding=True)
    except RecursionError:  # a YAML alias that contains itself (`a: &x [*x]`), or absurd nesting
        raise ConfigError(
            [
                f"{source}: a value refers to itself (a YAML alias used inside its own anchor) or is nested "
                "too deeply; a run config's sections are plain values, lists and mappings a few levels deep"
            ],
            what="run config",
        ) from None
    values = _check_dataclass(RunConfig, data, "", problems) or {}
    # Fields that failed their type check keep their defaults here, so the range and reference checks
    # still run on everything else and the user sees every problem in one go.
    config = _build(RunConfig, values)
    reported = {p.split(":", 1)[0] for p in problems}
    problems += [
        p for p in value_problems(config) + _check_references(config) if p.split(":", 1)[0] not in reported
    ]
    if problems:
        raise ConfigError(problems, what=f"run config {source!r}" if source != "config" else "run config")
    return config


def _moved_max_new_tokens(
    data: Mapping[str, Any], problems: list[str], overriding: bool = False
) -> dict[str, Any]:
    """``data`` with ``eval.max_new_tokens`` (the older spelling) moved to ``generation.max_new_tokens``;
    a file that gives both with different values is a problem (which one was meant?), an override
    (``overriding``) simply wins."""
    out = dict(data)
    section = out.get("eval")
    if not isinstance(section, Mapping) or section.get("max_new_tokens") is None:
        return out
    out["eval"] = {k: v for k, v in section.items() if k != "max_new_tokens"}
    generation = out.get("generation") if isinstance(out.get("generation"), Mapping) else {}
    given = generation.get("max_new_tokens")
    if given is not None and given != section["max_new_tokens"] and not overriding:
        problems.append(
            f"eval.max_new_tokens: {section['max_new_tokens']} disagrees with generation.max_new_tokens: "
            f"{given}; keep generation.max_new_tokens only (eval.max_new_tokens is its older spelling)"
        )
    out["generation"] = {**generation, "max_new_tokens": section["max_new_tokens"]}
    return out


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str], problems: list[str]) -> dict[str, Any]:
    """A deep copy of ``data`` with each ``dotted.key=value`` set (malformed overrides go to ``problems``)."""
    out = _deep_copy(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"override {item!r}: expected KEY=VALUE with a dotted key, e.g. train.lr=1e-3")
            continue
        try:
            value = parse_yaml(text) if text.strip() else None
        except yaml.YAMLError:
            value = text  # not YAML (e.g. an unbalanced bracket): keep the text as given
        parts = key.split(".")
        node = out
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                problems.append(f"override {item!r}: {where} is {_show(child)}, not a section with keys")
                break
            node = child
        else:
            node[parts[-1]] = value
    return out


def _deep_copy(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


# -- types -----------------------------------------------------------------------------------------


class _Bad:
    """A value that failed its type check (its problem was recorded)."""


_BAD = _Bad()


def _check_dataclass(cls: type, data: Any, path: str, problems: list[str]) -> dict[str, Any] | None:
    """Field values of ``cls`` from the mapping ``data``, type-checked; problems are appended."""
    if not isinstance(data, Mapping):
        problems.append(
            f"{path or 'config'}: expected a section of keys ({_field_list(cls)}), got {_show(data)}"
        )
        return None
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, Any] = {}
    for key, value in data.items():
        here = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(names)}"
            problems.append(f"{here}: unknown key; {hint}")
            continue
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            section = _check_dataclass(hint, value, here, problems)
            if section is not None:
                values[key] = section
        elif cls is RunConfig and key == "adapter":
            values[key] = _check_adapter(value, problems)
        else:
            converted, why = _coerce(value, hint)
            if why:
                problems.append(f"{here}: {why}")
            else:
                values[key] = converted
    return values


def _coerce(value: Any, hint: Any) -> tuple[Any, str | None]:
    """``value`` converted to the annotated type ``hint`` (ints widen to floats), or a reason it cannot be."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is object:
        return value, None
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return (None, None) if type(None) in args else (_BAD, f"expected {_describe(hint)}, got null")
        for arg in args:
            if arg is not type(None):
                converted, why = _coerce(value, arg)
                if why is None:
                    return converted, None
        return _BAD, f"expected {_describe(hint)}, got {_show(value)}"
    if origin is typing.Literal:
        return (
            (value, None)
            if value in args
            else (_BAD, f"expected one of {', '.join(map(repr, args))}, got {_show(value)}")
        )
    if value is None:
        return _BAD, f"expected {_describe(hint)}, got null (leave the key out to keep its default)"
    if hint is bool:
        return (
            (value, None)
            if isinstance(value, bool)
            else (_BAD, f"expected true or false, got {_show(value)}")
        )
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # `steps: 1e3`
        ok = isinstance(value, int) and not isinstance(value, bool)
        return (value, None) if ok else (_BAD, f"expected an integer, got {_show(value)}")
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return (float(value), None) if ok else (_BAD, f"expected a number, got {_show(value)}")
    if hint is str:
        return (value, None) if isinstance(value, str) else (_BAD, f"expected a string, got {_show(value)}")
    if origin in (list, tuple) and args:
        if not isinstance(value, list):
            return _BAD, f"expected {_describe(hint)}, got {_show(value)}"
        items = [_coerce(v, args[0]) for v in value]
        bad = [f"item {i}: {why}" for i, (_, why) in enumerate(items) if why]
        return ([v for v, _ in items], None) if not bad else (_BAD, "; ".join(bad))
    if origin is dict and args:
        if not isinstance(value, Mapping):
            return _BAD, f"expected {_describe(hint)}, got {_show(value)}"
        out, bad = {}, []
        for k, v in value.items():
            key, why_key = _coerce(k, args[0])
            item, why = _coerce(v, args[1])
            bad += [f"key {k!r}: {w}" for w in (why_key, why) if w]
            out[key] = item
        return (out, None) if not bad else (_BAD, "; ".join(bad))
    return value, None  # an annotation this checker does not model: the config class validates it


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    if origin is dict:
        return "a mapping" + (
            f" of {_describe(args[1]).removeprefix('a ').removeprefix('an ')}s" if args else ""
        )
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _show(value: Any) -> str:
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    kind = {dict: "a mapping", list: "a list", type(None): "null"}.get(type(value), type(value).__name__)
    return text if value is None else f"{text} ({kind})"


def _field_list(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def _build(cls: type, values: Mapping[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {
        key: _build(hints[key], value) if dataclasses.is_dataclass(hints[key]) else value
        for key, value in values.items()
    }
    return cls(**kwargs)


# -- the adapter section ---------------------------------------------------------------------------


def _check_adapter(section: Any, problems: list[str]) -> dict[str, Any]:
    """The adapter section: ``method`` plus the method's own fields, checked by the method's config."""
    if not isinstance(section, Mapping):
        problems.append(
            f"adapter: expected a section with `method` and that method's fields, got {_show(section)}"
        )
        return {"method": "lora"}
    fields = dict(section)
    method = fields.pop("method", "lora")
    if not isinstance(method, str):
        problems.append(f"adapter.method: expected a method name such as 'lora', got {_show(method)}")
        return dict(section)
    if method.lower() == FULL_FINE_TUNING:
        problems += [
            f"adapter.{key}: `method: full` trains every parameter and takes no other field; "
            "remove it, or choose an adapter method"
            for key in fields
        ]
        return {"method": FULL_FINE_TUNING}
    if fields.get("target_modules") == AUTO:
        # chosen by `select` before training; the rest of the section must be a valid LoRA config
        if method.lower() != "lora":
            problems.append(
                f"adapter.target_modules: `auto` allocates LoRA ranks, so it needs method: lora (got "
                f"{method!r}); name the targets for {method}, or switch to lora"
            )
            return {"method": method, **fields}
        problems += adapter_problems(method, {k: v for k, v in fields.items() if k != "target_modules"})
        return {"method": method, **fields}
    problems += adapter_problems(method, fields)
    return {"method": method, **fields}


def adapter_problems(method: str, fields: Mapping[str, Any]) -> list[str]:
    """Every problem of ``adapter: {method: ..., **fields}``, each with its ``adapter.`` path."""
    from ..api import make_config
    from ..core import registry

    try:
        config_cls = registry.find_method(method).config_cls
    except KeyError as exc:
        return [f"adapter.method: {exc.args[0]}, or 'full' for full fine-tuning"]
    try:
        hints = typing.get_type_hints(config_cls)
    except (NameError, TypeError):  # annotations naming types only imported for type checkers
        hints = {}
    names = [f.name for f in dataclasses.fields(config_cls) if f.init]
    out: list[str] = []
    known: dict[str, Any] = {}
    for key, value in fields.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else f"its fields are: {', '.join(sorted(names))}"
            out.append(f"adapter.{key}: {config_cls.__name__} has no field {key!r}; {hint}")
            continue
        converted, why = _coerce(value, hints.get(key, Any))
        if why:
            out.append(f"adapter.{key}: {why}")
        else:
            known[key] = converted
    try:  # with the well-typed fields only: the method's own checks assume them
        make_config(method, **known)
    except ConfigError as exc:
        out += [_prefixed(p, names) for p in exc.problems]
    except (TypeError, ValueError) as exc:  # a check the config class does without ConfigError
        out.append(f"adapter: {config_cls.__name__} refused these fields: {exc}")
    return out


def _prefixed(problem: str, names: list[str]) -> str:
    """``adapter.<field>: ...`` for a method problem that starts with one of its field names."""
    head = re.match(r"([A-Za-z_][\w]*)", problem)
    if head and head.group(1) in names:
        return f"adapter.{problem}"
    return f"adapter: {problem}"


def lr_candidates(adapter: dict[str, Any]) -> tuple[float, ...]:
    """The learning rates worth trying for the method of an ``adapter`` section (its registry entry's).

    Raises:
        ConfigError: the method is unknown.
    """
    from ..core import registry

    method = str(adapter.get("method", "lora"))
    if method.lower() == FULL_FINE_TUNING:
        return FULL_FINE_TUNING_LR_CANDIDATES
    try:
        return tuple(registry.find_method(method).config_cls.lr_candidates)
    except KeyError as exc:
        raise ConfigError([f"adapter.method: {exc.args[0]}"], what="run config") from None


# -- values ----------------------------------------------------------------------------------------

Check = tuple[str, Callable[[Any], bool], str]


def _known_encoding(name: str) -> bool:
    import codecs

    try:
        codecs.lookup(name)
    except LookupError:
        return False
    return True


# (field path, predicate on the value, what is expected). The dataclasses keep no validation of their
# own (they are plain typed records shared by the library and the CLI), so ranges live here.
_VALUE_CHECKS: list[Check] = [
    ("model.dtype", lambda v: v in ("float32", "bfloat16", "float16"), "one of float32, bfloat16, float16"),
    (
        "model.num_labels",
        lambda v: v is None or v >= 2,
        "at least 2 classes, or null to count them from the data",
    ),
    ("model.quantize", lambda v: v in (None, "nf4", "fp4", "int8"), "null, nf4, fp4 or int8"),
    (
        "model.pooling",
        lambda v: v in ("auto", "mean", "cls", "max", "last", "pooler"),
        "one of auto, mean, cls, max, last, pooler",
    ),
    ("data.max_length", lambda v: v > 0, "a positive number of tokens"),
    ("data.max_train_examples", lambda v: v is None or v > 0, "a positive count, or null for all"),
    ("data.max_eval_examples", lambda v: v is None or v > 0, "a positive count, or null for all"),
    ("data.split.validation", lambda v: 0 <= v < 1, "a fraction in [0, 1)"),
    ("data.split.test", lambda v: 0 <= v < 1, "a fraction in [0, 1)"),
    ("data.encoding", _known_encoding, "a text encoding Python knows, e.g. utf-8, latin-1 or cp1252"),
    (
        "data.labels",
        lambda v: v is None or (len(v) >= 2 and len(set(v)) == len(v)),
        "at least 2 distinct class names",
    ),
    (
        "train.steps",
        lambda v: v is None or v > 0,
        "a positive number of optimizer steps, or null to run train.epochs",
    ),
    ("train.epochs", lambda v: v > 0, "a positive number of passes"),
    ("train.batch_size", lambda v: v > 0, "a positive number of examples"),
    ("train.grad_accum", lambda v: v > 0, "a positive number of forward passes per step"),
    ("train.lr", lambda v: 0 < v < float("inf"), "a positive learning rate, e.g. 2e-4"),
    ("train.weight_decay", lambda v: v >= 0, "a non-negative number"),
    (
        "train.lora_plus_ratio",
        lambda v: v is None or v > 0,
        "a positive ratio (16 in the LoRA+ paper), or null",
    ),
    ("train.schedule", lambda v: v in ("linear", "cosine", "constant"), "one of linear, cosine, constant"),
    (
        "train.warmup_steps",
        lambda v: v is None or v >= 0,
        "a non-negative number of steps, or null to use warmup_ratio",
    ),
    ("train.warmup_ratio", lambda v: 0 <= v < 1, "a fraction in [0, 1)"),
    ("train.max_grad_norm", lambda v: v is None or v > 0, "a positive norm, or null for no clipping"),
    ("train.precision", lambda v: v in ("fp32", "bf16"), "fp32 or bf16"),
    ("train.eval_every", lambda v: v >= 0, "a non-negative number of steps (0: only at the end)"),
    ("train.metric", lambda v: bool(v), "a metric name such as loss or accuracy"),
    (
        "train.early_stopping_patience",
        lambda v: v is None or v > 0,
        "a positive number of evaluations, or null",
    ),
    ("train.save_every", lambda v: v >= 0, "a non-negative number of steps (0: at evaluations and the end)"),
    ("train.log_every", lambda v: v >= 0, "a non-negative number of steps"),
    ("train.device", lambda v: _DEVICE.fullmatch(v) is not None, "auto, cpu, cuda, cuda:N or mps"),
    ("eval.batch_size", lambda v: v > 0, "a positive number of examples"),
    ("eval.split", lambda v: v in SPLITS, "one of train, validation, test"),
    (
        "train.report_to",
        lambda v: v is None or set(v) <= set(REPORT_TO),
        f"a list of {', '.join(REPORT_TO)}, or null",
    ),
    ("eval.max_new_tokens", lambda v: v is None or v > 0, "a positive number of tokens, or null"),
    ("generation.max_new_tokens", lambda v: v > 0, "a positive number of tokens"),
    (
        "generation.temperature",
        lambda v: v is None or v >= 0,
        "a non-negative temperature (0: greedy), or null",
    ),
    ("generation.top_p", lambda v: v is None or 0 < v <= 1, "a probability mass in (0, 1], or null"),
    ("generation.top_k", lambda v: v is None or v > 0, "a positive number of tokens, or null"),
    ("generation.num_beams", lambda v: v >= 1, "a beam width of 1 or more (1: no beam search)"),
    ("generation.repetition_penalty", lambda v: v > 0, "a positive penalty (1: off)"),
    ("output_dir", lambda v: bool(v.strip()), "a directory path"),
]


def value_problems(config: RunConfig) -> list[str]:
    problems = []
    for path, ok, expected in _VALUE_CHECKS:
        value = _get(config, path)
        if not ok(value):
            problems.append(f"{path}: expected {expected}, got {value!r}")
    split = config.data.split
    if 0 <= split.validation < 1 and 0 <= split.test < 1 and split.validation + split.test >= 1:
        problems.append(
            f"data.split: validation + test must leave examples for training, got "
            f"{split.validation} + {split.test} >= 1"
        )
    problems += _quantize_problems(config)
    problems += _select_problems(config)
    for name in ("system_prompt", "chat_template"):
        if getattr(config.data, name) is not None and config.task != "causal-lm":
            problems.append(
                f"data.{name}: only causal-lm runs read it (this run's task is {config.task!r}); remove it"
            )
    if lower_is_better(config.train.metric) and config.train.greater_is_better is True:
        problems.append(f"train.greater_is_better: a lower {config.train.metric} is better; set it to false")
    return problems


def _quantize_problems(config: RunConfig) -> list[str]:
    quant = config.model.quantize
    if quant not in ("nf4", "fp4", "int8"):
        return []
    problems = []
    method = str(config.adapter.get("method", "lora")).lower() if isinstance(config.adapter, dict) else ""
    if method == "full":
        problems.append(
            "model.quantize: full fine-tuning cannot train quantized weights; use an adapter "
            "(method: lora or ia3) or set model.quantize: null"
        )
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        problems.append(
            f"model.quantize: {quant} needs bitsandbytes; install it with `pip install bitsandbytes`"
        )
    return problems


def _select_problems(config: RunConfig) -> list[str]:
    from ..select import INITS, RULES, parse_budget

    sel = config.select
    problems = []
    auto = isinstance(config.adapter, dict) and config.adapter.get("target_modules") == AUTO
    if auto and sel.budget is None:
        problems.append(
            "select.budget: `adapter.target_modules: auto` needs a parameter budget, e.g. "
            "select: {budget: 0.5%} (a share of the base model) or select: {budget: 82944}"
        )
    if sel.budget is not None:
        try:
            parse_budget(sel.budget, 1)
        except ValueError as exc:
            problems.append(f"select.budget: {exc}")
    if sel.score not in RULES:
        problems.append(f"select.score: expected one of {', '.join(RULES)}, got {sel.score!r}")
    if sel.probe_batches < 1:
        problems.append(
            f"select.probe_batches: expected a positive number of batches, got {sel.probe_batches}"
        )
    if sel.probe_batch_size is not None and sel.probe_batch_size < 1:
        problems.append(
            f"select.probe_batch_size: expected a positive number of examples, got {sel.probe_batch_size}"
        )
    if not 1 <= sel.min_rank <= sel.max_rank:
        problems.append(
            f"select.min_rank, select.max_rank: need 1 <= min_rank <= max_rank, got {sel.min_rank} "
            f"and {sel.max_rank}"
        )
    if sel.init not in INITS:
        problems.append(f"select.init: expected one of {', '.join(INITS)}, got {sel.init!r}")
    if sel.init_from is not None:
        method = str(config.adapter.get("method", "lora")).lower() if isinstance(config.adapter, dict) else ""
        if auto:
            problems.append(
                "select.init_from: a run that selects (target_modules: auto) starts from its own "
                "probe's directions; drop select.init_from, or train the selected.yaml it belongs to"
            )
        elif method != "lora":
            problems.append(
                f"select.init_from: initial LoRA directions need adapter.method=lora, got {method!r}"
            )
        elif not Path(sel.init_from).is_file():
            problems.append(
                f"select.init_from: {sel.init_from!r} does not exist; it is the init.safetensors that "
                "`peftkit select` writes beside selected.yaml (or set select.init_from: null)"
            )
    return problems


def _get(config: Any, path: str) -> Any:
    for part in path.split("."):
        config = getattr(config, part)
    return config


def _check_references(config: RunConfig) -> list[str]:
    """Names that must exist: the task, the bundled model or local path, the data set or files."""
    from ..tasks import registered_tasks, task_class

    problems: list[str] = []
    tasks = registered_tasks()
    if config.task not in tasks:
        problems.append(
            f"task: unknown task {config.task!r}; {_suggest(config.task, tasks, 'registered tasks')}"
        )
    else:
        task = task_class(config.task)
        train = config.train
        if (
            train.metric == getattr(task, "default_metric", None)
            and train.greater_is_better is not None
            and train.greater_is_better != task.greater_is_better
        ):
            better = "larger" if task.greater_is_better else "smaller"
            problems.append(
                f"train.greater_is_better: a {better} {train.metric} is better for task {config.task!r}; "
                f"set it to {str(task.greater_is_better).lower()}"
            )
    problems += _model_problems(config.model)
    problems += _data_problems(config.data)
    return problems


def _suggest(name: str, known: list[str], what: str) -> str:
    close = difflib.get_close_matches(name.lower(), known, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{hint}{what}: {', '.join(known) or 'none'}"


def _model_problems(model: ModelConfig) -> list[str]:
    from ..models import source_problem

    problem = source_problem(model.name_or_path, model.gguf_file)
    if problem:
        return [f"model.name_or_path: {problem.rstrip('; ')}"]
    local = Path(model.name_or_path).expanduser()
    if model.gguf_file and local.is_dir() and not (local / model.gguf_file).is_file():
        return [f"model.gguf_file: {model.gguf_file!r} is not in {str(local)!r}"]
    return []


def _data_problems(data: DataConfig) -> list[str]:
    from ..data import bundled_datasets
    from ..data.files import file_format

    given = [f"data.{name}" for name in ("name", "files", "hub") if getattr(data, name) is not None]
    if len(given) > 1:
        return [f"data: {' and '.join(given)} are each a source of examples; keep one of them"]
    if not given:
        return [
            f"data: set data.name to a bundled data set ({', '.join(bundled_datasets()) or 'none'}), "
            "data.files to a CSV / JSONL / Parquet file, or data.hub to a Hugging Face Hub data set"
        ]
    problems = _chat_template_problems(data)
    if data.hub_splits and data.hub is None:
        problems.append("data.hub_splits: only read with data.hub; remove it or set data.hub")
    if data.hub is not None:
        from ..data.hub import config_problems as hub_problems

        return problems + hub_problems(data)
    if data.name is not None:
        known = bundled_datasets()
        return problems + (
            []
            if data.name in known
            else [
                f"data.name: unknown bundled data set {data.name!r}; {_suggest(data.name, known, 'bundled')} (or give data.files)"
            ]
        )
    files = data.files if isinstance(data.files, dict) else {"": data.files}
    problems += [
        f"data.files.{key}: expected one of {', '.join(SPLITS)} as the key"
        for key in files
        if key and key not in SPLITS
    ]
    if isinstance(data.files, dict) and not data.files:
        problems.append("data.files: an empty mapping; give a file, or a mapping split -> file")
    for key, file in files.items():
        here = f"data.files.{key}" if key else "data.files"
        if not Path(file).expanduser().is_file():
            problems.append(
                f"{here}: {file!r} does not exist (relative paths start from {str(Path.cwd())!r})"
            )
        try:
            file_format(file, data.format)
        except ConfigError as exc:
            problems += [p for p in exc.problems if p not in problems]
    return problems


def _chat_template_problems(data: DataConfig) -> list[str]:
    from ..data.chat import template_problem

    problem = template_problem(data.chat_template)
    return [f"data.chat_template: {problem}"] if problem else []


# -- writing ---------------------------------------------------------------------------------------


def resolved(config: RunConfig) -> RunConfig:
    """A copy of ``config`` whose local paths are absolute, so it runs from any working directory."""

    def absolute(path: str) -> str:
        return str(Path(path).expanduser().resolve())

    model, data = config.model, config.data
    name = model.name_or_path
    if name.lower() not in _bundled_models() and Path(name).expanduser().exists():
        model = dataclasses.replace(model, name_or_path=absolute(name))
    if isinstance(data.files, str):
        data = dataclasses.replace(data, files=absolute(data.files))
    elif isinstance(data.files, dict):
        data = dataclasses.replace(data, files={k: absolute(v) for k, v in data.files.items()})
    from ..data.chat import is_template_file

    if data.chat_template and is_template_file(data.chat_template):
        data = dataclasses.replace(data, chat_template=absolute(data.chat_template))
    select = config.select
    if select.init_from:
        select = dataclasses.replace(select, init_from=absolute(select.init_from))
    return dataclasses.replace(
        config, model=model, data=data, select=select, output_dir=absolute(config.output_dir)
    )


def _bundled_models() -> list[str]:
    from ..models import bundled_models

    return bundled_models()


def to_dict(config: RunConfig) -> dict[str, Any]:
    """The config as plain YAML-ready data, sections in schema order."""
    return dataclasses.asdict(config)


def dump_config(config: RunConfig, path: str | os.PathLike | None = None) -> str:
    """The config as YAML (written to ``path`` too when given); :func:`load_config` reads it back."""
    text = yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=False, allow_unicode=True)
    if path is not None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(target.name + ".tmp")
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, target)  # atomic: a reader never sees half a config
    return text


__all__ = [
    "FULL_FINE_TUNING",
    "FULL_FINE_TUNING_LR_CANDIDATES",
    "lr_candidates",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "adapter_problems",
    "apply_overrides",
    "dump_config",
    "load_config",
    "parse_config",
    "parse_yaml",
    "resolved",
    "to_dict",
]

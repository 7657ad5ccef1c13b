"""The comparison config (``peftkit compare CONFIG.yaml``): a run config plus a ``compare:`` section.

The top-level sections (``task``, ``model``, ``data``, ``adapter``, ``train``, ``eval``) are what every
run shares; ``compare.runs`` lists the runs, each a ``name`` plus the sections it changes. A run's
``adapter`` replaces the shared one (``method: full`` is full fine-tuning); its other sections are
merged key by key into the shared ones (so ``train: {lr: 5e-5}`` changes the learning rate only).
``output_dir`` is the comparison's directory; each run trains in ``runs/<name>/seed-<s>/`` under it::

    task: text-classification
    model: {name_or_path: minilm}
    data: {name: rotten_tomatoes, max_length: 64}
    train: {steps: 80, batch_size: 16, eval_every: 20, metric: accuracy, greater_is_better: true}
    output_dir: runs/compare-sentiment
    compare:
      seeds: [0, 1, 2]
      runs:
        - {name: full, adapter: {method: full}, train: {lr: 5.0e-5}}
        - {name: lora, adapter: {method: lora, r: 8, target_modules: [query, value]}, train: {lr: 2.0e-3}}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.registry import FULL_FINE_TUNING
from ..errors import ConfigError
from ..run.config import parse_config, resolved, to_dict
from ..run.loader import apply_overrides, parse_yaml
from ..run.schema import RunConfig

if TYPE_CHECKING:
    from .tune import TunePlan

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
SETTINGS = {  # compare: key -> (default, what it is); the docs table is checked against this
    "seeds": ([0, 1, 2], "the seeds every run is repeated with (train.seed); an integer n means 0..n-1"),
    "runs": (None, "the runs: a list of {name, adapter, and any section to change}"),
    "target_fraction": (0.95, "time to target: first evaluation reaching this share of the reference's best"),
    "reference": ("full", "the run whose best validation metric defines the target (default: full)"),
    "probe_examples": (256, "held-out inputs the forgetting probe uses (0: no forgetting measurement)"),
    "latency_repeats": (5, "timed forward passes per latency figure (the median is reported)"),
    "tune": (
        None,
        "choose each run's learning rate (and any listed field) on the validation split first: "
        "{lr: [...], seeds: 1, steps: N}; see docs/compare.md",
    ),
}


@dataclass
class PlannedRun:
    """One training run of a comparison: a method's config with one seed.

    Attributes:
        name: The run's name in the comparison (a row of the report).
        seed: Its ``train.seed``.
        config: The complete run config (``output_dir`` inside the comparison's directory).
        key: A hash of ``config``: a finished record with another key is stale and re-run.
    """

    name: str
    seed: int
    config: RunConfig
    key: str

    @property
    def label(self) -> str:
        return f"{self.name} seed {self.seed}"


@dataclass
class CompareConfig:
    """A checked comparison: where it writes, its settings and every planned run."""

    output_dir: Path
    seeds: list[int]
    names: list[str]
    runs: list[PlannedRun]
    target_fraction: float = 0.95
    reference: str | None = "full"
    probe_examples: int = 256
    latency_repeats: int = 5
    source: dict[str, Any] = field(default_factory=dict)
    tuning: dict[str, TunePlan] = field(default_factory=dict)  # run name -> its search, for tuned runs
    templates: dict[str, dict[str, Any]] = field(default_factory=dict)  # run name -> its merged sections

    def with_choices(self, choices: Mapping[str, Mapping[str, Any]]) -> CompareConfig:
        """The comparison with each tuned run's fields set to the values its search chose."""
        runs = []
        for run in self.runs:
            chosen = choices.get(run.name)
            if not chosen:
                runs.append(run)
                continue
            config = plan_run(self.templates[run.name], run.name, run.seed, self.output_dir, dict(chosen), [])
            runs.append(PlannedRun(run.name, run.seed, config, config_key(config)) if config else run)
        return dataclasses.replace(self, runs=runs)

    def select(self, names: Iterable[str]) -> CompareConfig:
        """Only the runs named in ``names``.

        Raises:
            ConfigError: a name is not one of the comparison's runs.
        """
        wanted = list(names)
        unknown = [n for n in wanted if n not in self.names]
        if unknown:
            raise ConfigError(
                [f"--only: {', '.join(map(repr, unknown))} not among the runs {self.names}"],
                what="comparison",
            )
        return dataclasses.replace(
            self,
            names=[n for n in self.names if n in wanted],
            runs=[r for r in self.runs if r.name in wanted],
            tuning={n: t for n, t in self.tuning.items() if n in wanted},
        )


def load_compare_config(
    path: str | Path, overrides: Iterable[str] = (), seeds: list[int] | None = None
) -> CompareConfig:
    """Read and check a comparison config.

    Args:
        path: The YAML file.
        overrides: ``dotted.key=value`` applied to the shared sections (every run), e.g. ``train.steps=50``,
            or to the compare section (``compare.target_fraction=0.9``).
        seeds: Replace ``compare.seeds``.

    Raises:
        ConfigError: the file is missing or invalid; every problem of every run is listed, each headed
            by its run (``compare.runs[1] (lora): train.lr: ...``).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            [
                f"comparison config {str(path)!r} does not exist; give a YAML file with a compare: "
                "section, e.g. configs/compare-sentiment-minilm.yaml"
            ],
            what="comparison config",
        )
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except Exception as exc:  # yaml.YAMLError, UnicodeDecodeError
        raise ConfigError([f"{path}: not valid YAML: {exc}"], what="comparison config") from None
    return parse_compare_config(data, overrides, seeds, source=str(path))


def parse_compare_config(
    data: Any,
    overrides: Iterable[str] = (),
    seeds: list[int] | None = None,
    source: str = "comparison config",
) -> CompareConfig:
    """Check the mapping ``data`` (see :func:`load_compare_config`)."""
    from .tune import parse_tune, plan_search

    problems: list[str] = []
    if not isinstance(data, Mapping):
        raise ConfigError(
            [f"{source}: expected a mapping of sections with a compare: section"], what="comparison config"
        )
    data = apply_overrides(data, overrides, problems)
    section = data.pop("compare", None)
    if not isinstance(section, Mapping):
        raise ConfigError(
            [
                f"{source}: no compare: section (a mapping with runs: [...]); `peftkit train` runs a "
                "single config"
            ],
            what="comparison config",
        )
    settings = _settings(section, problems)
    if seeds is not None:
        settings["seeds"] = _seed_list(seeds, problems)
    output_dir = Path(str(data.get("output_dir") or "runs/compare"))
    names: list[str] = []
    planned: list[PlannedRun] = []
    templates: dict[str, dict[str, Any]] = {}
    tuning: dict[str, TunePlan] = {}
    tune = parse_tune(settings["tune"], "compare.tune", problems)
    for index, run in enumerate(settings["runs"] or []):
        where = f"compare.runs[{index}]"
        if (
            not isinstance(run, Mapping)
            or not isinstance(run.get("name"), str)
            or not NAME.fullmatch(run["name"])
        ):
            problems.append(
                f"{where}: expected a mapping with a name (letters, digits, _ . + -), got {run!r}"
            )
            continue
        name = run["name"]
        if name in names:
            problems.append(f"{where}: the name {name!r} is used twice; give each run its own name")
            continue
        names.append(name)
        templates[name] = _merged(data, {k: v for k, v in run.items() if k not in ("name", "tune")})
        before = len(problems)
        for seed in settings["seeds"] or [0]:  # bad seeds are reported; the run itself is still checked
            config = plan_run(templates[name], name, seed, output_dir, {}, problems, f"{where} ({name})")
            if config is not None:
                planned.append(PlannedRun(name, seed, config, config_key(config)))
        if len(problems) == before:
            own = (
                parse_tune(run.get("tune"), f"{where}.tune", problems, allow_false=True)
                if "tune" in run
                else None
            )
            search = plan_search(
                name,
                templates[name],
                tune,
                own,
                run.get("tune"),
                settings["seeds"] or [0],
                output_dir,
                problems,
                f"{where} ({name})",
            )
            if search is not None:
                tuning[name] = search
    if settings["runs"] is None or settings["runs"] == [] and isinstance(section.get("runs"), list):
        problems.append("compare.runs: list at least one run, e.g. - {name: lora, adapter: {method: lora}}")
    reference = settings["reference"]
    if reference and names and reference not in names:
        if section.get("reference") is not None:
            problems.append(f"compare.reference: {reference!r} is not one of the runs {names}")
        reference = None  # without a full fine-tuning run, the best run's metric is the target
    if problems:
        raise ConfigError(problems, what=f"comparison config {source!r}")
    return CompareConfig(
        output_dir=output_dir.expanduser().resolve(),
        seeds=settings["seeds"],
        names=names,
        runs=planned,
        target_fraction=settings["target_fraction"],
        reference=reference,
        probe_examples=settings["probe_examples"],
        latency_repeats=settings["latency_repeats"],
        source={**data, "compare": dict(section)},
        tuning=tuning,
        templates=templates,
    )


def plan_run(
    template: Mapping[str, Any],
    name: str,
    seed: int,
    output_dir: Path,
    overrides: Mapping[str, Any],
    problems: list[str],
    where: str = "",
    run_dir: Path | None = None,
) -> RunConfig | None:
    """The checked run config of run ``name`` with ``seed``: its merged sections with the dotted
    ``overrides`` set (``{"train.lr": 1e-3}``), training in ``run_dir`` (default
    ``<output_dir>/runs/<name>/seed-<seed>``). Problems are appended to ``problems`` (None returned)."""
    merged = json.loads(json.dumps(template, default=str))
    for path, value in overrides.items():
        section, _, key = path.partition(".")
        if not isinstance(merged.get(section), dict):
            merged[section] = {}
        merged[section][key] = value
    merged["output_dir"] = str(run_dir or output_dir / "runs" / name / f"seed-{seed}")
    merged.setdefault("train", {})["seed"] = seed
    try:
        return resolved(parse_config(merged, source=where or name))
    except ConfigError as exc:
        problems += [f"{where}: {p}" for p in exc.problems if f"{where}: {p}" not in problems]
        return None


def _init_reads_data(config: RunConfig) -> bool:
    """The adapter's init starts from the probe batches (LoRA's EVA, CorDA: the method's ``data_inits``)."""
    from ..core import registry

    adapter = config.adapter if isinstance(config.adapter, dict) else {}
    try:
        cls = registry.find_method(str(adapter.get("method", registry.DEFAULT_METHOD))).config_cls
    except KeyError:
        return False
    return adapter.get("init_lora_weights") in getattr(cls, "data_inits", ())


def config_key(config: RunConfig) -> str:
    """A short hash of everything that decides a run's outcome (``select`` only when the run selects its
    targets or its init reads the probe batches, so that a new selection setting does not make every other
    finished run stale)."""
    from ..select.choose import is_auto

    data = to_dict(config)
    if not is_auto(config.adapter) and not config.select.init_from and not _init_reads_data(config):
        data.pop("select", None)
    elif isinstance(data.get("select"), dict):
        # fields added later, at the values that reproduce what runs did before they existed: records
        # made then keep their key
        for key, before in (("init", "random"), ("init_from", None)):
            if data["select"].get(key, before) == before:
                data["select"].pop(key, None)
    _as_before(data, config)
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# Fields added after records were first written, with the value that reproduces what runs did before
# they existed: at that value a field leaves the key alone, so finished records stay finished.
ADDED_LATER = {
    "data": {
        "encoding": "utf-8",
        "hub": None,
        "hub_splits": {},
        "system_prompt": None,
        "chat_template": None,
        "add_special_tokens": None,
    },
    "train": {"report_to": None, "optimizer": "adamw"},
}


def _as_before(data: dict[str, Any], config: RunConfig) -> None:
    """Rewrite ``data`` (a run config as a dict) so fields added or re-defaulted later hash as they did."""
    for section, fields in ADDED_LATER.items():
        for key, before in fields.items():
            if isinstance(data.get(section), dict) and data[section].get(key, before) == before:
                data[section].pop(key, None)
    from ..tasks.generation import settings_of

    # the generation section replaced eval.max_new_tokens; greater_is_better's default became "from the metric"
    generation = data.pop("generation", None)
    if isinstance(generation, dict) and generation != {
        **to_dict(RunConfig())["generation"],
        "max_new_tokens": generation.get("max_new_tokens"),
    }:
        data["generation"] = {k: v for k, v in generation.items() if k != "max_new_tokens"}
    if isinstance(data.get("eval"), dict):
        data["eval"]["max_new_tokens"] = settings_of(config.generation, config.eval).max_new_tokens
    if isinstance(data.get("train"), dict):
        data["train"]["greater_is_better"] = config.train.maximize
        # train.precision hashes as what it resolves to here: "auto" on a machine without native bf16
        # is fp32, the old default, so those records stay finished; with bf16 the runs are new
        from ..train.runtime import resolve_device, resolve_precision

        try:
            device = resolve_device(config.train.device)
            data["train"]["precision"] = resolve_precision(config.train.precision, device)
        except ConfigError:
            pass  # a device this machine lacks: the run will say so; the key keeps the field as written
    # data.pad_to_multiple_of hashes as the multiple it resolves to: 1 (every run before the field
    # existed) hashes as before; bf16 runs, which now pad to 8, are new runs
    if isinstance(data.get("data"), dict) and isinstance(data.get("train"), dict):
        from ..run.config import with_padding

        data["data"].pop("pad_to_multiple_of", None)
        precision = data["train"].get("precision")
        if precision in ("fp32", "bf16"):
            multiple = with_padding(config, precision).data.pad_to_multiple_of
            if multiple != 1:
                data["data"]["pad_to_multiple_of"] = multiple
    # model.base_dropout hashes as the mode it stands for: "keep" (what every run did before the field
    # existed) hashes as before, and a changed default for "auto" changes the key of the runs it changes
    if isinstance(data.get("model"), dict):
        from ..models.config import base_dropout_mode

        data["model"].pop("base_dropout", None)
        full = str(config.adapter.get("method", "")).lower() == FULL_FINE_TUNING
        mode = base_dropout_mode(config.model, full)
        if mode != "keep":
            data["model"]["base_dropout"] = mode


def _settings(section: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    out = {key: default for key, (default, _) in SETTINGS.items()}
    for key, value in section.items():
        if key not in SETTINGS:
            problems.append(f"compare.{key}: unknown key; valid keys: {', '.join(SETTINGS)}")
            continue
        out[key] = value
    out["seeds"] = _seed_list(out["seeds"], problems)
    if out["runs"] is not None and not isinstance(out["runs"], list):
        problems.append(f"compare.runs: expected a list of runs, got {out['runs']!r}")
        out["runs"] = []
    fraction = out["target_fraction"]
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1:
        problems.append(f"compare.target_fraction: expected a number in (0, 1], got {fraction!r}")
    probe, repeats = out["probe_examples"], out["latency_repeats"]
    if isinstance(probe, bool) or not isinstance(probe, int) or probe < 0 or probe in (1, 2):
        problems.append(
            f"compare.probe_examples: expected an integer >= 3 (or 0: no forgetting probe), got {probe!r}"
        )
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        problems.append(f"compare.latency_repeats: expected an integer >= 1, got {repeats!r}")
    if out["reference"] is not None and not isinstance(out["reference"], str):
        problems.append(f"compare.reference: expected a run name, got {out['reference']!r}")
    return out


def _seed_list(value: Any, problems: list[str]) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return list(range(value))
    if (
        isinstance(value, list)
        and value
        and len(set(value)) == len(value)
        and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value)
    ):
        return list(value)
    problems.append(
        f"compare.seeds: expected a positive count or a list of distinct non-negative integers, got {value!r}"
    )
    return []


def _merged(shared: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """The shared sections with one run's changes: ``adapter`` and scalars replace, sections merge."""
    out = json.loads(json.dumps(shared, default=str))
    for key, value in changes.items():
        if key != "adapter" and isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merged(out[key], value)
        else:
            out[key] = json.loads(json.dumps(value, default=str))
    return out


__all__ = [
    "SETTINGS",
    "CompareConfig",
    "PlannedRun",
    "config_key",
    "load_compare_config",
    "parse_compare_config",
    "plan_run",
]

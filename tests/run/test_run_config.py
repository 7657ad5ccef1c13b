"""Run configs: YAML + dotted overrides -> a checked RunConfig, every problem reported with its path."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml

from peftkit.errors import ConfigError
from peftkit.run import schema
from peftkit.run.config import apply_overrides, dump_config, load_config, parse_config, parse_yaml, resolved
from peftkit.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
MINIMAL = {
    "task": "text-classification",
    "model": {"name_or_path": "minilm"},
    "data": {"name": "rotten_tomatoes"},
}


def problems_of(data, overrides=()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, overrides)
    return info.value.problems


def paths_of(problems: list[str]) -> list[str]:
    return [p.split(":", 1)[0] for p in problems]


def test_a_minimal_config_gets_typed_sections_and_defaults():
    config = parse_config(MINIMAL)
    assert isinstance(config.train, TrainConfig) and isinstance(config.data.split, schema.SplitConfig)
    assert config.train == TrainConfig() and config.eval == schema.EvalConfig()
    assert config.adapter == {"method": "lora"} and config.model.name_or_path == "minilm"


def test_overrides_are_dotted_paths_with_yaml_values():
    config = parse_config(
        MINIMAL,
        [
            "train.lr=1e-3",
            "train.steps=1e3",
            "adapter.r=16",
            "adapter.target_modules=[query,value]",
            "data.columns.text=review",
            "train.max_grad_norm=",
            "eval.before_training=true",
            "output_dir=runs/x=y",
        ],
    )
    assert config.train.lr == 0.001 and isinstance(config.train.lr, float)
    assert config.train.steps == 1000 and isinstance(config.train.steps, int)
    assert config.adapter == {"method": "lora", "r": 16, "target_modules": ["query", "value"]}
    assert config.data.columns == {"text": "review"}
    assert config.train.max_grad_norm is None and config.eval.before_training is True
    assert config.output_dir == "runs/x=y"  # only the first "=" separates key and value


def test_yaml_numbers_in_exponent_form_are_floats():
    assert parse_yaml("lr: 2e-4\nx: 1.0e-3\ny: '1e-3'\nz: 5") == {"lr": 2e-4, "x": 1e-3, "y": "1e-3", "z": 5}


def test_malformed_overrides_are_problems_too():
    problems: list[str] = []
    out = apply_overrides({"train": {"lr": 0.1}}, ["train.lr", "=3", "train..lr=1", "train.lr.x=1"], problems)
    assert out == {"train": {"lr": 0.1}}
    assert len(problems) == 4
    assert "expected KEY=VALUE" in problems[0] and "train.lr is 0.1 (float), not a section" in problems[3]


def test_every_problem_is_reported_at_once_with_its_field_path():
    data = {
        "task": "text-clasification",
        "model": {"name_or_path": "minilmm", "dtype": "float64"},
        "data": {"nme": "rotten_tomatoes", "max_length": -3},
        "adapter": {"method": "lora", "rr": 8, "lora_dropout": "x"},
        "train": {"lr": -1e-3, "steps": "abc", "lrr": 3, "schedule": "triangle", "tensorboard": "yes please"},
        "eval": {"split": "dev"},
        "trian": {},
    }
    problems = problems_of(data, ["adapter.r=-2"])
    assert sorted(paths_of(problems)) == sorted(
        [
            "task",
            "model.name_or_path",
            "model.dtype",
            "data.nme",
            "data.max_length",
            "data",
            "adapter.rr",
            "adapter.lora_dropout",
            "adapter.r",
            "train.lr",
            "train.steps",
            "train.lrr",
            "train.schedule",
            "train.tensorboard",
            "eval.split",
            "trian",
        ]
    )
    text = "\n".join(problems)
    assert "trian: unknown key; did you mean 'train'?" in text
    assert "train.lrr: unknown key; did you mean 'lr'?" in text
    assert "data.nme: unknown key; did you mean 'name'?" in text
    assert "adapter.rr: LoraConfig has no field 'rr'; did you mean 'r'?" in text
    assert "adapter.r: must be a positive integer, got -2" in text
    assert "task: unknown task 'text-clasification'; did you mean 'text-classification'?" in text
    assert "model.name_or_path: 'minilmm' is not a bundled model" in text and "did you mean 'minilm'?" in text
    assert "train.steps: expected an integer or null, got 'abc' (str)" in text
    assert "train.lr: expected a positive learning rate" in text
    assert "train.tensorboard: expected true or false" in text


def test_a_key_without_a_close_match_lists_the_valid_keys():
    (problem,) = problems_of({**MINIMAL, "eval": {"zzz": 1}})
    assert problem.startswith("eval.zzz: unknown key; valid keys: batch_size, split,")


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("train.batch_size", 0, "a positive number of examples"),
        ("train.warmup_ratio", 1.5, "a fraction in [0, 1)"),
        ("train.device", "gpu", "auto, cpu, cuda, cuda:N or mps"),
        ("train.precision", "fp16", "auto, fp32 or bf16"),
        ("train.early_stopping_patience", 0, "a positive number of evaluations"),
        ("data.split.test", 1.0, "a fraction in [0, 1)"),
        ("model.num_labels", 1, "at least 2 classes"),
        ("eval.batch_size", -1, "a positive number of examples"),
    ],
)
def test_out_of_range_values_name_what_is_expected(field, value, expected):
    (problem,) = problems_of(MINIMAL, [f"{field}={value}"])
    assert problem.startswith(f"{field}: expected {expected}")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=true", "train.lr: expected a number, got True (bool)"),
        ("train.epochs=1.5", "train.epochs: expected an integer, got 1.5 (float)"),
        ("data.labels=neg", "data.labels: expected a list of strings or null, got 'neg' (str)"),
        ("data.columns=[text]", "data.columns: expected a mapping of strings, got ['text'] (a list)"),
        ("model=minilm", "model: expected a section of keys (name_or_path, dtype,"),
        ("train.seed=", "train.seed: expected an integer, got null"),
    ],
)
def test_wrong_types_name_the_expected_type(override, message):
    problems = problems_of(MINIMAL, [override])
    assert any(p.startswith(message) for p in problems), problems


def test_integers_widen_to_floats():
    config = parse_config(MINIMAL, ["train.lr=1", "train.max_grad_norm=2"])
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float) and config.train.max_grad_norm == 2.0


def test_unknown_method_suggests_the_closest_and_full_fine_tuning():
    (problem,) = problems_of({**MINIMAL, "adapter": {"method": "loar"}})
    assert problem.startswith("adapter.method: unknown PEFT method 'loar'; did you mean 'lora'?")
    assert "'full' for full fine-tuning" in problem


def test_full_fine_tuning_takes_no_adapter_fields():
    assert parse_config({**MINIMAL, "adapter": {"method": "full"}}).adapter == {"method": "full"}
    (problem,) = problems_of({**MINIMAL, "adapter": {"method": "full", "r": 8}})
    assert problem.startswith("adapter.r: `method: full` trains every parameter")


def test_the_adapter_section_is_checked_by_the_methods_own_config():
    config = parse_config({**MINIMAL, "adapter": {"method": "ia3", "target_modules": ["key", "value"]}})
    assert config.adapter["method"] == "ia3"
    problems = problems_of(
        {**MINIMAL, "adapter": {"method": "lora", "r": 8, "lora_dropout": 2.0, "bias": "x"}}
    )
    assert sorted(paths_of(problems)) == ["adapter.bias", "adapter.lora_dropout"]


def test_unknown_data_set_and_missing_files(tmp_path):
    (problem,) = problems_of({**MINIMAL, "data": {"name": "rotten_tomatos"}})
    assert problem.startswith(
        "data.name: unknown bundled data set 'rotten_tomatos'; did you mean 'rotten_tomatoes'?"
    )
    missing = str(tmp_path / "nope.csv")
    problems = problems_of({**MINIMAL, "data": {"files": {"train": missing, "dev": missing}}})
    assert "data.files.dev: expected one of train, validation, test as the key" in problems
    assert f"data.files.train: {missing!r} does not exist" in "\n".join(problems)
    (problem,) = problems_of({**MINIMAL, "data": {"name": "rotten_tomatoes", "files": missing}})
    assert "data.name and data.files are each a source of examples; keep one of them" in problem
    (problem,) = problems_of({**MINIMAL, "data": {}})
    assert problem.startswith("data: set data.name to a bundled data set (")


def test_data_file_format_comes_from_the_extension_or_data_format(tmp_path):
    text = tmp_path / "reviews.txt"
    text.write_text("review,label\nfine,1\n")
    (problem,) = problems_of({**MINIMAL, "data": {"files": str(text)}})
    assert problem.startswith("data.format: cannot tell the format of")
    assert parse_config({**MINIMAL, "data": {"files": str(text), "format": "csv"}}).data.format == "csv"


def test_model_paths_and_hub_ids(tmp_path):
    (problem,) = problems_of({**MINIMAL, "model": {"name_or_path": str(tmp_path)}})
    assert "is not a model directory (no config.json in it)" in problem  # an empty directory
    (tmp_path / "config.json").write_text("{}")
    assert parse_config({**MINIMAL, "model": {"name_or_path": str(tmp_path)}}).model.name_or_path == str(
        tmp_path
    )
    assert parse_config({**MINIMAL, "model": {"name_or_path": "org-name/model.v2"}})  # a hub id
    (problem,) = problems_of({**MINIMAL, "model": {"name_or_path": "./no/such/model"}})
    assert problem.startswith("model.name_or_path: './no/such/model' does not exist")
    (problem,) = problems_of({**MINIMAL, "model": {"name_or_path": str(tmp_path), "gguf_file": "x.gguf"}})
    assert problem.startswith("model.gguf_file: 'x.gguf' is not in")


def test_greater_is_better_follows_the_metric_unless_set_against_it():
    # unset: decided from the metric (the newcomer who writes `metric: accuracy` alone is right)
    assert parse_config(MINIMAL, ["train.metric=accuracy"]).train.maximize is True
    assert parse_config(MINIMAL, ["train.metric=perplexity"]).train.maximize is False
    assert parse_config(MINIMAL, []).train.maximize is False  # loss
    (problem,) = problems_of(MINIMAL, ["train.metric=accuracy", "train.greater_is_better=false"])
    assert problem == (
        "train.greater_is_better: a larger accuracy is better for task 'text-classification'; set it to true"
    )
    (problem,) = problems_of(MINIMAL, ["train.greater_is_better=true"])
    assert problem.startswith("train.greater_is_better: a lower loss is better")
    assert (
        parse_config(MINIMAL, ["train.metric=accuracy", "train.greater_is_better=true"]).train.maximize
        is True
    )
    (problem,) = problems_of(MINIMAL, ["train.report_to=[tensorboard, wandbb]"])
    assert problem.startswith("train.report_to: expected a list of tensorboard, wandb, mlflow, jsonl")


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist .*give the path of a YAML run config"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="is a directory, not a YAML file"):
        load_config(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {lr: 1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="the top level must be a mapping of sections"):
        load_config(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing but a comment\n")
    (problem,) = problems_of({})
    with pytest.raises(ConfigError) as info:
        load_config(empty)
    assert info.value.problems == [problem]  # an empty file is the all-defaults config


def test_dump_then_load_gives_the_same_config(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\na,0\n")
    with pytest.MonkeyPatch.context() as patch:  # relative paths start from the working directory
        patch.chdir(tmp_path)
        config = parse_config(
            {
                **MINIMAL,
                "data": {"files": "d.csv", "columns": {"text": "t"}},
                "adapter": {"method": "lora", "r": 4, "target_modules": ["query"]},
            },
            ["train.lr=3e-4", "eval.metrics=[accuracy]", "output_dir=runs/a"],
        )
        full = resolved(config)
    assert full.data.files == str(csv) and full.output_dir == str(tmp_path / "runs" / "a")
    assert full.model.name_or_path == "minilm"  # a bundled name stays a name
    text = dump_config(full, tmp_path / "run" / "config.yaml")
    assert load_config(tmp_path / "run" / "config.yaml") == full
    assert yaml.safe_load(text)["train"]["lr"] == 3e-4


# -- docs/config.md is the reference of every field --------------------------------------------------

SECTIONS = {
    "": schema.RunConfig,
    "model": schema.ModelConfig,
    "data": schema.DataConfig,
    "data.split": schema.SplitConfig,
    "train": TrainConfig,
    "eval": schema.EvalConfig,
    "generation": schema.GenerationSettings,
    "select": schema.SelectConfig,
}


def documented_fields() -> dict[str, dict[str, str]]:
    """Section -> {field: default as written} from the tables of docs/config.md.

    A table follows a heading whose text holds the section in backticks (top level: "top level").
    """
    text = (ROOT / "docs" / "config.md").read_text()
    tables: dict[str, dict[str, str]] = {}
    section = None
    for line in text.splitlines():
        heading = re.match(r"#+ .*?`([\w.]+)`", line) or re.match(r"#+ (top level)", line)
        if heading:
            section = "" if heading.group(1) == "top level" else heading.group(1)
            continue
        row = re.match(r"\|\s*`(\w+)`\s*\|[^|]*\|\s*(.*?)\s*\|", line)
        if row and section is not None:
            tables.setdefault(section, {})[row.group(1)] = row.group(2)
    return tables


def default_text(field: dataclasses.Field) -> str:
    """A field's default as the docs write it: YAML for values, the section name for sections."""
    if field.default is not dataclasses.MISSING:
        value = field.default
    else:
        value = field.default_factory()  # type: ignore[misc]
    if dataclasses.is_dataclass(value):
        return "(section)"
    return "`" + yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip() + "`"


@pytest.mark.parametrize("section", list(SECTIONS))
def test_docs_config_lists_every_field_with_its_default(section):
    documented = documented_fields().get(section, {})
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    name = section or "top level"
    assert sorted(documented) == sorted(fields), f"docs/config.md `{name}` table vs {cls.__name__} fields"
    for key, field in fields.items():
        if dataclasses.is_dataclass(hints[key]):
            continue
        assert documented[key] == default_text(field), f"{name}.{key}: default in docs/config.md"


# -- configs/*.yaml: every recipe loads and is headed by its command ---------------------------------

RECIPES = sorted((ROOT / "configs").glob("*.yaml")) + sorted(
    (ROOT / "configs" / "experiments").glob("*.yaml")
)


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_every_recipe_is_headed_by_its_command_and_loads(recipe, monkeypatch):
    from peftkit.compare import load_compare_config

    first = recipe.read_text().splitlines()[0]
    command = "compare" if first.startswith("# peftkit compare") else "train"
    where = recipe.relative_to(ROOT).as_posix()
    assert first.startswith(f"# peftkit {command} {where}"), f"{recipe.name}: first line {first!r}"
    monkeypatch.chdir(ROOT)  # recipes' relative paths start from the repository root
    (load_compare_config if command == "compare" else load_config)(recipe)


def test_lower_is_better_covers_losses_perplexities_and_error_rates():
    from peftkit.train.config import TrainConfig, lower_is_better

    assert all(
        lower_is_better(m) for m in ("loss", "eval_loss", "perplexity", "val_perplexity", "wer", "cer")
    )
    assert not any(lower_is_better(m) for m in ("accuracy", "macro_f1", "chrf", "exact_match"))
    assert TrainConfig(metric="eval_perplexity").maximize is False


def test_an_unknown_base_dropout_names_the_choices():
    with pytest.raises(
        ConfigError, match=r"model\.base_dropout: expected one of auto, keep, attention_off, all_off"
    ):
        parse_config({"model": {"base_dropout": "attention"}})


def test_a_bare_yaml_off_for_a_string_field_says_to_quote_it():
    with pytest.raises(
        ConfigError, match=r"model\.base_dropout: expected a string, got False \(bool\): quote"
    ):
        parse_config(parse_yaml("model: {base_dropout: off}"))


@pytest.mark.parametrize("value", [0, -8, 2.5, True, "eight"])
def test_pad_to_multiple_of_is_a_positive_count_or_auto(value):
    data = {
        "task": "text-classification",
        "model": {"name_or_path": "minilm"},
        "data": {"name": "rotten_tomatoes"},
    }
    problems = problems_of({**data, "data": {**data["data"], "pad_to_multiple_of": value}})
    assert any(
        p.startswith("data.pad_to_multiple_of") and ("positive number of tokens" in p or "expected" in p)
        for p in problems
    ), problems
    for fine in ("auto", 1, 8):
        parse_config({**data, "data": {**data["data"], "pad_to_multiple_of": fine}})

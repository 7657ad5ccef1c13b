"""Fuzzing what users and strangers hand peftkit (issue 10), with hypothesis.

Run configs (as mappings and as YAML text, plus dotted overrides), command lines, adapter configs and
data files must each either work or fail with the project's own clear error (``ConfigError``,
``AdapterFileError`` ...; exit code 2 for config errors on the command line): never an exception of an
unexpected type from somewhere inside. Malformed data rows are named by file and line.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import re
import warnings
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import peftkit
from peftkit import cli
from peftkit.core import io as adapter_io
from peftkit.core import registry
from peftkit.data.files import load_examples
from peftkit.errors import AdapterFileError, ConfigError, PeftkitError
from peftkit.run import config as run_config
from peftkit.run import inspect as run_inspect
from peftkit.run import runner, schema
from peftkit.train.config import TrainConfig

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["", "auto", "lora", "cuda:0", "minilm", "../x", "a/b", "1e-3", "\x00"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
SECTIONS = {
    "model": schema.ModelConfig,
    "data": schema.DataConfig,
    "train": TrainConfig,
    "eval": schema.EvalConfig,
}


def section(cls: type) -> st.SearchStrategy:
    """A mapping of some of ``cls``'s fields (and now and then an unknown key) to random values."""
    names = [f.name for f in dataclasses.fields(cls)] + ["unknown_key"]
    return st.dictionaries(st.sampled_from(names), VALUES, max_size=4)


def adapter_section() -> st.SearchStrategy:
    methods = registry.registered_methods()

    def fields_of(method: str) -> st.SearchStrategy:
        try:
            cls = registry.find_method(method).config_cls
            names = [f.name for f in dataclasses.fields(cls) if f.init]
        except KeyError:
            names = ["r", "target_modules"]
        return st.dictionaries(st.sampled_from(names), VALUES, max_size=3).map(
            lambda d: {"method": method, **d}
        )

    return st.one_of(
        st.sampled_from([m.lower() for m in methods] + ["full", "Lora", "nonsense"]).flatmap(fields_of),
        VALUES,
    )


RUN_CONFIGS = st.fixed_dictionaries(
    {},
    optional={
        "task": st.one_of(st.sampled_from(["text-classification", "causal-lm", "nope"]), VALUES),
        "output_dir": st.one_of(st.just("runs/x"), VALUES),
        "adapter": adapter_section(),
        **{name: st.one_of(section(cls), VALUES) for name, cls in SECTIONS.items()},
    },
)
OVERRIDES = st.lists(
    st.one_of(
        st.text(max_size=20),
        st.builds(
            lambda k, v: f"{k}={v}",
            st.sampled_from(
                [
                    "train.lr",
                    "train.steps",
                    "adapter.r",
                    "data.split.test",
                    "model",
                    "train",
                    "a.b.c",
                    "train.lr.x",
                    ".",
                    "",
                ]
            ),
            st.text(max_size=10),
        ),
    ),
    max_size=3,
)


@FUZZ
@given(data=st.one_of(RUN_CONFIGS, VALUES), overrides=OVERRIDES)
@example(data={"model": {"name_or_path": "\x00"}}, overrides=[])
@example(data={"data": {"files": "a\x00.csv"}}, overrides=[])
@example(data={"train": {"lr": float("nan"), "device": "cuda:x"}}, overrides=["train.steps=1e400"])
def test_any_run_config_is_accepted_or_refused_with_a_config_error(data, overrides):
    try:
        config = run_config.parse_config(data, overrides)
    except ConfigError as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)
        return
    assert isinstance(config, schema.RunConfig)
    run_config.dump_config(config)  # what loads also writes back


@FUZZ
@given(
    text=st.one_of(
        st.text(max_size=80),
        VALUES.map(lambda v: yaml.safe_dump(v, allow_unicode=True)),
        RUN_CONFIGS.map(lambda v: yaml.safe_dump(v, allow_unicode=True)),
    )
)
@example(text="train: {lr: !!python/object/apply:os.system ['touch pwned']}")
@example(text="a: &a [*a]")
@example(text="\t- not yaml: [")
def test_any_yaml_text_is_accepted_or_refused_with_a_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("yaml") / "run.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        run_config.load_config(path)
    except ConfigError:
        pass
    assert not (Path.cwd() / "pwned").exists()  # YAML tags never construct Python objects


# ----------------------------------------------------------------------------------- command line

GOOD = "task: text-classification\nmodel: {name_or_path: minilm}\ndata: {name: rotten_tomatoes}\n"


@contextlib.contextmanager
def fake_library():
    """The command line for real, the heavy library calls replaced: only parsing and configs run."""
    result = type("R", (), {"ok": True, "status": "completed", "run_dir": "runs/x", "metrics": {}})()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "train_run", lambda config, resume=False, log=print: result)
        patch.setattr(runner, "eval_run", lambda source, split=None, batch_size=None: {"split": split})
        patch.setattr(runner, "predict_run", lambda run_dir, inputs, batch_size=None: [])
        patch.setattr(runner, "merge_run", lambda run_dir, out_dir: out_dir)
        patch.setattr(run_inspect, "inspect_model", lambda model, task=None, config=None: "report")
        patch.setattr(cli, "_demo", lambda args: cli.EXIT_OK)
        yield


def run_cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, err.getvalue()


TOKENS = st.one_of(
    st.sampled_from(
        [
            "train",
            "eval",
            "predict",
            "merge",
            "inspect",
            "demo",
            "--resume",
            "--split",
            "validation",
            "--batch-size",
            "0",
            "-3",
            "7",
            "--json",
            "--task",
            "--steps",
            "--lr",
            "nan",
            "--targets",
            "",
            "-",
            "GOOD",
            "BAD",
            "DIR",
            "MISSING",
            "train.lr=-1",
            "adapter.r=abc",
            "train.steps=",
            "a.b=1",
            "=",
            "adapter.method=nonsense",
        ]
    ),
    st.text(max_size=10),
)


def test_any_command_line_exits_0_1_or_2_and_never_raises(tmp_path):
    (tmp_path / "good.yaml").write_text(GOOD)
    (tmp_path / "bad.yaml").write_text("train: {lr: [}")
    paths = {
        "GOOD": str(tmp_path / "good.yaml"),
        "BAD": str(tmp_path / "bad.yaml"),
        "DIR": str(tmp_path),
        "MISSING": str(tmp_path / "missing.yaml"),
    }

    @FUZZ
    @given(argv=st.lists(TOKENS, max_size=5))
    @example(argv=["train", "GOOD", "--resume", "train.lr=-1"])
    @example(argv=["eval", "DIR", "train.lr=1"])
    @example(argv=["predict", "DIR", "MISSING"])
    def check(argv):
        code, err = run_cli([paths.get(a, a) for a in argv])
        assert code in (cli.EXIT_OK, cli.EXIT_FAILURE, cli.EXIT_USAGE), (argv, code, err)
        # an exception of a type the command line did not expect is printed with its type and a hint
        assert "PEFTKIT_DEBUG=1 shows the traceback" not in err, (argv, err)

    with fake_library():
        check()


def test_train_with_any_overrides_is_ok_or_a_config_error_never_a_crash(tmp_path):
    (tmp_path / "good.yaml").write_text(GOOD)

    @FUZZ
    @given(overrides=OVERRIDES)
    @example(overrides=["train.lr=.nan", "adapter.r=1e999"])
    @example(overrides=["adapter={method: lora, r: -1}", "train=[]"])
    def check(overrides):
        code, err = run_cli(
            ["train", str(tmp_path / "good.yaml"), *[o for o in overrides if not o.startswith("-")]]
        )
        assert code in (cli.EXIT_OK, cli.EXIT_USAGE), (overrides, code, err)
        if code == cli.EXIT_USAGE:
            assert err.startswith("peftkit train: error: ") and err.strip()

    with fake_library():
        check()


# ---------------------------------------------------------------------------------- adapter configs


def adapter_configs() -> st.SearchStrategy:
    def for_method(method: str) -> st.SearchStrategy:
        cls = registry.find_method(method).config_cls
        names = [f.name for f in dataclasses.fields(cls) if f.init] + ["newer_key"]
        return st.dictionaries(st.sampled_from(names), VALUES, max_size=4).map(
            lambda d: {**d, "peft_type": cls.peft_type}
        )

    return st.one_of(st.sampled_from(registry.registered_methods()).flatmap(for_method), VALUES)


@FUZZ
@given(data=adapter_configs())
@example(data={"peft_type": "LORA", "r": [], "target_modules": {"a": 1}})
@example(data={"peft_type": "LORA", "rank_pattern": {"(": "x"}, "layers_to_transform": [-1]})
def test_any_adapter_config_json_is_read_or_refused_with_a_peftkit_error(tmp_path_factory, data):
    directory = tmp_path_factory.mktemp("adapter")
    (directory / adapter_io.CONFIG_NAME).write_text(json.dumps(data, allow_nan=True))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unknown keys warn: allowed
            config = peftkit.read_adapter_config(directory)
    except (ConfigError, AdapterFileError) as exc:
        assert str(directory) in str(exc)
        return
    assert type(config).peft_type == data["peft_type"]


# -------------------------------------------------------------------------------------- data rows

SAFE_TEXT = st.text(st.characters(whitelist_categories=("L", "N"), whitelist_characters=" "), max_size=8)
GOOD_ROW = st.fixed_dictionaries({"text": SAFE_TEXT.filter(str.strip), "label": st.integers(0, 1)})
BAD_JSON_LINE = st.one_of(
    st.just("{"),
    st.just('{"text": "a", "label": 1'),
    st.just("[1, 2]"),
    st.just('"text"'),
    st.just("3"),
    st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=10),
)


def _is_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return not line.strip()  # blank lines are skipped


@FUZZ
@given(rows=st.lists(st.one_of(GOOD_ROW.map(json.dumps), BAD_JSON_LINE), min_size=1, max_size=6))
def test_malformed_json_lines_are_named_by_file_and_line(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("jsonl") / "rows.jsonl"
    text = "\n".join(rows) + "\n"
    path.write_text(text, encoding="utf-8")
    bad = [n for n, line in enumerate(text.split("\n"), 1) if not _is_object(line)]
    try:
        load_examples(schema.DataConfig(files=str(path)), ["text", "label"])
    except ConfigError as exc:
        message = str(exc)
        assert str(path) in message
        if bad:
            assert f"line {bad[0]}:" in message, (rows, message)
        return
    except PeftkitError:
        raise
    assert not bad, f"a malformed line was accepted: {rows}"


@FUZZ
@given(rows=st.lists(st.tuples(st.lists(SAFE_TEXT, min_size=2, max_size=4)), min_size=1, max_size=6))
def test_csv_rows_with_extra_fields_are_named_by_file_and_line(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("csv") / "rows.csv"
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["text", "label"])
    for (fields,) in rows:
        writer.writerow(fields if len(fields) > 2 else [fields[0] or "x", "1"])
    path.write_text(buffer.getvalue(), encoding="utf-8")
    bad = [n + 2 for n, (fields,) in enumerate(rows) if len(fields) > 2]
    try:
        load_examples(schema.DataConfig(files=str(path)), ["text", "label"])
    except ConfigError as exc:
        assert str(path) in str(exc)
        if bad:
            assert re.search(rf"line {bad[0]}: \d field\(s\), but the header line has 2", str(exc)), str(exc)
        return
    assert not bad

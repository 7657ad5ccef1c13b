"""A new user's first hour (issue 19): mistakes a newcomer makes get an exit code 2 and a message that
names what was wrong and the fix, and leave nothing half-written behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftkit.cli import main

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "configs" / "sentiment-minilm-lora.yaml")


@pytest.mark.parametrize(
    "model, expected",
    [
        ("runs/nothing", "'runs/nothing' does not exist (relative paths start from"),
        ("no-such-dir/a/b", "does not exist"),
        ("RECIPE", "is a file, not a model directory"),
        ("CONFIGS", "is not a model directory (no config.json in it)"),
        ("minlm", "did you mean 'minilm'?"),
    ],
)
def test_a_model_path_that_is_not_a_model_is_a_config_error(model, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    model = {"RECIPE": RECIPE, "CONFIGS": str(REPO / "configs")}.get(model, model)
    assert main(["train", RECIPE, f"model.name_or_path={model}", f"output_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert "model.name_or_path: " in err and expected in err and "Repo id" not in err
    assert not (tmp_path / "out").exists()


def test_inspect_of_a_missing_model_directory_is_a_config_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert main(["inspect", "runs/nothing"]) == 2
    err = capsys.readouterr().err
    assert "'runs/nothing' does not exist" in err and "Repo id" not in err


def test_targets_that_match_nothing_name_the_field_the_suffix_and_inspect(tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        main(
            [
                "train",
                RECIPE,
                "adapter.target_modules=[querry, value]",
                f"output_dir={out}",
                "data.max_train_examples=16",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "adapter.target_modules: target 'querry' matched 0 modules; closest: 'query'." in err
    assert "`peftkit inspect minilm`" in err and "encoder.layer" not in err
    assert not out.exists()  # nothing written: the corrected rerun needs no --resume


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, reviews_csv, tmp_path_factory):  # noqa: F811
    from peftkit.run import runner
    from support.runs import make_config

    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert runner.train_run(
        make_config(tiny_model_dir, reviews_csv, out, train={"steps": 2}), log=lambda line: None
    ).ok
    return out


def test_predict_names_the_missing_key_and_takes_input_key(tiny_run, tmp_path, capsys):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"sentence": "a great film"}\n{"sentence": "dull"}\n')
    assert main(["predict", str(tiny_run), str(inputs)]) == 2
    err = capsys.readouterr().err
    assert (
        "input 1 is a JSON object without 'text' (its keys: 'sentence')" in err
        and "--input-key sentence" in err
    )
    assert main(["predict", str(tiny_run), str(inputs), "--input-key", "sentence"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_a_bundled_model_is_recorded_by_its_hub_id_and_a_local_one_by_its_path(tiny_run, tiny_model_dir):  # noqa: F811
    import json

    from peftkit.models import portable_name

    assert portable_name("minilm") == "sentence-transformers/all-MiniLM-L6-v2"
    assert portable_name("SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert portable_name("efficientnet-lite0") == "efficientnet-lite0"  # no hub copy: its bundled name
    saved = json.loads((tiny_run / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(tiny_model_dir)


def test_eval_of_a_missing_path_names_both_accepted_forms(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "runs/nothing"]) == 2
    err = capsys.readouterr().err
    assert "'runs/nothing' does not exist" in err and "a run directory" in err and "run config YAML" in err


def test_a_latin1_csv_names_data_encoding_and_reads_with_it(tmp_path):
    from peftkit.data.files import load_examples
    from peftkit.errors import ConfigError
    from peftkit.run.schema import DataConfig, SplitConfig

    path = tmp_path / "reviews.csv"
    path.write_bytes(
        "text,label\nun film très réussi,pos\nennuyeux,neg\ncliché,neg\nsuperbe,pos\n".encode("latin-1")
    )
    with pytest.raises(
        ConfigError, match=r"line 2: not utf-8 text .*set data\.encoding \(e\.g\. latin-1 or cp1252\)"
    ):
        load_examples(DataConfig(files=str(path)), ["text", "label"])
    splits = load_examples(
        DataConfig(files=str(path), encoding="latin-1", split=SplitConfig(validation=0.0, test=0.0)),
        ["text", "label"],
    )
    assert "un film très réussi" in {e["text"] for e in splits["train"]}


def test_an_unknown_encoding_is_a_config_error():
    from peftkit.errors import ConfigError
    from peftkit.run.config import parse_config

    with pytest.raises(ConfigError, match=r"data\.encoding: expected a text encoding Python knows"):
        parse_config({"data": {"files": "x.csv", "encoding": "latin-42"}})

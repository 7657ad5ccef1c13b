"""The runner behind `peftkit train / eval / predict / merge`, end to end on a tiny BERT and a CSV file.

The model is a 2-layer, 32-wide BERT with a word-level vocabulary saved to a temporary directory, so
the real text-classification task, data loading from a local file with a column mapping, the real
training loop and the interchange format all take part; every run takes a second or two.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import peftkit
from peftkit.errors import ConfigError
from peftkit.run import runner
from peftkit.run.config import dump_config, load_config
from peftkit.tasks import register_task, registered_tasks
from peftkit.tasks.text_classification import TextClassificationTask
from support.runs import make_config


@pytest.fixture(scope="module")
def trained(tiny_model_dir, reviews_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "lora"
    return runner.train_run(make_config(tiny_model_dir, reviews_csv, out), log=lambda line: None)


def test_train_run_writes_the_run_directory(trained):
    run_dir = trained.run_dir
    assert trained.ok and trained.status == "completed"
    assert (run_dir / "config.yaml").is_file() and (run_dir / "metrics.json").is_file()
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(trained.metrics))
    assert metrics["method"] == "lora" and metrics["steps"] == 6 and metrics["status"] == "completed"
    assert set(metrics["test"]) >= {"loss", "accuracy", "macro_f1"} and set(metrics["before"]) >= {"accuracy"}
    assert metrics["weights"] == "best" and metrics["best_step"] in (3, 6)
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    assert metrics["data"]["sizes"] == {"train": 72, "validation": 24, "test": 24}
    # the saved config is the resolved one: it loads back to the config the run used
    assert load_config(run_dir / "config.yaml").output_dir == str(run_dir)


def test_eval_run_reproduces_the_numbers_of_training(trained):
    test = runner.eval_run(trained.run_dir)
    assert test["split"] == "test" and test["examples"] == 24
    assert test["accuracy"] == trained.metrics["test"]["accuracy"]
    assert test["loss"] == pytest.approx(trained.metrics["test"]["loss"], abs=1e-6)
    validation = runner.eval_run(trained.run_dir, "validation")
    assert validation["accuracy"] == trained.metrics["best_validation"]
    assert json.loads((trained.run_dir / "eval-validation.json").read_text()) == validation


def test_eval_run_of_a_config_measures_the_untrained_base_model(trained):
    config = load_config(trained.run_dir / "config.yaml")
    base = runner.eval_run(config, "test")
    assert base["accuracy"] == trained.metrics["before"]["accuracy"]
    assert base["loss"] == pytest.approx(trained.metrics["before"]["loss"], abs=1e-6)


def test_predict_run_gives_one_prediction_per_input_in_order(trained):
    inputs = ["the film was great", {"text": "a dull plot"}, "boring"]
    predictions = runner.predict_run(trained.run_dir, inputs)
    assert len(predictions) == 3
    assert all(p["label"] in ("neg", "pos") and 0.5 <= p["score"] <= 1 for p in predictions)
    assert runner.predict_run(trained.run_dir, []) == []


def test_merge_run_exports_a_model_plain_transformers_loads(trained, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = runner.merge_run(trained.run_dir, tmp_path / "merged")
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer(["the film was great", "a dull and boring plot"], padding=True, return_tensors="pt")
    adapted = runner.load_run(trained.run_dir).model
    with torch.no_grad():
        expected = adapted(**batch).logits
        got = merged(**batch).logits
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert merged.config.id2label == {0: "neg", 1: "pos"}


def test_merge_run_refuses_a_directory_in_use(trained, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        runner.merge_run(trained.run_dir, tmp_path / "taken")
    assert (tmp_path / "taken" / "file.txt").read_text() == "keep me"


def test_a_second_run_into_the_same_directory_needs_resume(trained):
    config = load_config(trained.run_dir / "config.yaml")
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        runner.train_run(config, log=lambda line: None)
    # resuming a finished run continues from its last checkpoint: nothing left to do, same result
    again = runner.train_run(config, resume=True, log=lambda line: None)
    assert again.ok and again.metrics["test"] == trained.metrics["test"]


def test_full_fine_tuning_trains_and_exports_every_parameter(tiny_model_dir, reviews_csv, tmp_path):
    from transformers import AutoModelForSequenceClassification

    config = make_config(
        tiny_model_dir,
        reviews_csv,
        tmp_path / "full",
        adapter={"method": "full"},
        train={"steps": 2, "eval_every": 0},
    )
    result = runner.train_run(config, log=lambda line: None)
    assert result.ok and result.metrics["method"] == "full"
    assert result.metrics["base_dropout"]["mode"] == "keep", "auto keeps full fine-tuning's own dropout"
    assert result.metrics["trainable_params"] == result.metrics["total_params"]
    assert (tmp_path / "full" / "model" / "model.safetensors").is_file()
    assert not (tmp_path / "full" / "adapter").exists()
    assert runner.eval_run(tmp_path / "full")["accuracy"] == result.metrics["test"]["accuracy"]
    out = runner.merge_run(tmp_path / "full", tmp_path / "export")
    exported = AutoModelForSequenceClassification.from_pretrained(out)
    trained_model = runner.load_run(tmp_path / "full").model
    for (name, a), (_, b) in zip(exported.state_dict().items(), trained_model.state_dict().items()):
        assert torch.equal(a, b), name


def test_every_adapter_method_name_goes_through_make_config(tiny_model_dir, reviews_csv, tmp_path):
    config = make_config(
        tiny_model_dir,
        reviews_csv,
        tmp_path / "ia3",
        adapter={
            "method": "ia3",
            "target_modules": ["key", "value", "output.dense"],
            "feedforward_modules": ["output.dense"],
        },
    )
    model = runner.adapt(runner.build_task(config).load_model(), config)
    assert type(peftkit.adapter_config(model)) is peftkit.IA3Config


def test_a_warned_adapter_start_is_a_line_of_the_run_log_not_a_python_warning(
    tiny_model_dir, reviews_csv, tmp_path
):
    # the tiny BERT's 32 x 32 attention weights: FourierFT's default random start moves them far
    adapter = {"method": "fourierft", "n_frequency": 64, "target_modules": ["query", "value"]}
    config = make_config(tiny_model_dir, reviews_csv, tmp_path / "fourierft", adapter=adapter)
    lines = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runner.adapt(runner.build_task(config).load_model(), config, log=lines.append)
    (line,) = [line for line in lines if line.startswith("warning: FourierFT's random start")]
    assert "Set init_weights=True" in line
    quiet = make_config(
        tiny_model_dir, reviews_csv, tmp_path / "zero", adapter={**adapter, "init_weights": True}
    )
    lines.clear()
    runner.adapt(runner.build_task(quiet).load_model(), quiet, log=lines.append)
    assert not [line for line in lines if line.startswith("warning:")]


@pytest.mark.parametrize(
    "precision, dtype, given, padded",
    [
        ("fp32", "float32", "auto", 1),
        ("bf16", "float32", "auto", 8),
        ("fp32", "bfloat16", "auto", 8),
        ("bf16", "float32", 1, 1),
        ("fp32", "float32", 16, 16),
    ],
)
def test_auto_padding_follows_the_precision_the_run_computes_in(
    tiny_model_dir, reviews_csv, tmp_path, precision, dtype, given, padded
):
    from peftkit.run.config import with_padding

    config = make_config(
        tiny_model_dir, reviews_csv, tmp_path, data={"pad_to_multiple_of": given}, model={"dtype": dtype}
    )
    assert with_padding(config, precision).data.pad_to_multiple_of == padded


def test_the_run_directory_keeps_the_padding_it_trained_with(trained):
    from peftkit.run.config import load_config

    # the suite pins auto precision to fp32 (tests/conftest.py): auto padding is the longest example
    assert load_config(trained.run_dir / "config.yaml").data.pad_to_multiple_of == 1


@register_task("test-nan-loss")
class NanLossTask(TextClassificationTask):
    """Text classification whose loss becomes NaN: a stand-in for a run that diverges."""

    def loss(self, model, batch):
        return super().loss(model, batch) * float("nan")


def test_a_diverged_run_reports_it_and_exports_nothing(tiny_model_dir, reviews_csv, tmp_path):
    assert "test-nan-loss" in registered_tasks()
    config = make_config(
        tiny_model_dir,
        reviews_csv,
        tmp_path / "nan",
        task="test-nan-loss",
        train={"metric": "loss", "greater_is_better": False},
        eval={"before_training": False},
    )
    result = runner.train_run(config, log=lambda line: None)
    assert not result.ok and result.status == "diverged"
    metrics = json.loads((tmp_path / "nan" / "metrics.json").read_text())
    assert metrics["status"] == "diverged" and "test" not in metrics
    assert not (tmp_path / "nan" / "adapter").exists()


@register_task("test-interrupt-once")
class InterruptOnceTask(TextClassificationTask):
    """Text classification whose 5th loss call raises KeyboardInterrupt, once per process (a Ctrl-C)."""

    calls = 0

    def loss(self, model, batch):
        type(self).calls += 1
        if type(self).calls == 5:
            raise KeyboardInterrupt
        return super().loss(model, batch)


def test_an_interrupted_run_resumed_ends_as_the_uninterrupted_one(
    trained, tiny_model_dir, reviews_csv, tmp_path
):
    config = make_config(
        tiny_model_dir, reviews_csv, tmp_path / "stopped", task="test-interrupt-once", train={"save_every": 1}
    )
    with pytest.raises(KeyboardInterrupt):
        runner.train_run(config, log=lambda line: None)
    assert not (tmp_path / "stopped" / "metrics.json").exists()
    lines: list[str] = []
    resumed = runner.train_run(config, resume=True, log=lines.append)
    assert resumed.ok and resumed.metrics["steps"] == 6
    assert resumed.metrics["test"] == trained.metrics["test"]
    assert resumed.metrics["best_step"] == trained.metrics["best_step"]


def test_load_run_explains_what_a_run_directory_is(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run directory: it has no config.yaml"):
        runner.load_run(tmp_path)


def test_a_run_without_weights_says_to_train_first(tiny_model_dir, reviews_csv, tmp_path):
    config = make_config(tiny_model_dir, reviews_csv, tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    dump_config(config, tmp_path / "empty" / "config.yaml")
    with pytest.raises(FileNotFoundError, match="holds no trained weights yet"):
        runner.eval_run(tmp_path / "empty")


# -- inspect ------------------------------------------------------------------------------------------


def test_inspect_groups_modules_prices_target_sets_and_shows_method_defaults(tiny_model_dir):
    from peftkit.run.inspect import inspect_model

    report = inspect_model(str(tiny_model_dir))
    assert report.model_class == "BertModel" and report.model_type == "bert"
    query = next(g for g in report.groups if g.pattern == "encoder.layer.N.attention.self.query")
    assert (query.kind, query.layers, query.shape, query.params) == (
        "Linear",
        [0, 1],
        "32 -> 32",
        2 * (32 * 32 + 32),
    )
    assert "lora" in report.kinds["Linear"] and "ln_tuning" in report.kinds["LayerNorm"]
    sets = {t.spec: t for t in report.target_sets}
    assert (sets["query"].modules, sets["query"].lora_params) == (2, 2 * 8 * (32 + 32))
    assert "self.query" not in sets  # selects exactly what "query" does
    assert sets["dense"].modules == 2 * 3 + 1  # attention.output, intermediate, output; pooler
    per_layer = 4 * 8 * (32 + 32) + 2 * 8 * (32 + 64)
    assert (sets["all-linear"].modules, sets["all-linear"].lora_params) == (13, 2 * per_layer + 8 * 64)
    defaults = {d.method: d for d in report.defaults}
    lora = defaults["lora"]
    assert lora.targets == ["encoder.layer.N.attention.self.query", "encoder.layer.N.attention.self.value"]
    assert (lora.modules, lora.added_params) == (4, 4 * 8 * 64)
    assert (
        defaults["prompt_tuning"].added_params is None
        and "num_virtual_tokens" in defaults["prompt_tuning"].note
    )
    text = str(report)
    assert "candidate target_modules (LoRA r=8 adds)" in text and "layers 0-1" in text


def test_inspect_through_a_run_config_uses_the_tasks_model(tiny_model_dir, reviews_csv, tmp_path):
    from peftkit.run.inspect import inspect_model

    report = inspect_model("ignored", config=make_config(tiny_model_dir, reviews_csv, tmp_path / "x"))
    assert report.model_class == "BertForSequenceClassification"
    assert any(g.pattern == "classifier" and g.shape == "32 -> 2" for g in report.groups)


def test_resume_of_a_run_stopped_before_its_first_checkpoint_starts_it_over(
    tiny_model_dir, reviews_csv, tmp_path
):
    config = make_config(tiny_model_dir, reviews_csv, tmp_path / "run")
    dump_config(config, tmp_path / "run" / "config.yaml")  # what a run killed while loading leaves behind
    (tmp_path / "run" / "metrics.jsonl").write_text('{"event": "train", "step": 1, "loss": 0.7}\n')
    with pytest.raises(ConfigError, match="pass --resume"):
        runner.train_run(config, log=lambda line: None)
    lines: list[str] = []
    result = runner.train_run(config, resume=True, log=lines.append)
    assert result.ok and result.metrics["steps"] == 6
    assert any("starting the run from step 0" in line for line in lines)


def test_adalora_run_whose_best_checkpoint_predates_rank_pruning_tests_the_final_weights(
    tiny_model_dir, reviews_csv, tmp_path
):
    """Found by the selection experiment: AdaLoRA's ranks shrink during training, so a best/ checkpoint saved
    before the final budget no longer loads into the trained model; the run must fall back to final/."""
    adalora = {
        "method": "adalora",
        "init_r": 4,
        "target_r": 1,
        "target_modules": ["query", "value"],
        "tinit": 1,
        "tfinal": 2,
        "deltaT": 1,
        "total_step": 8,
    }
    config = make_config(
        tiny_model_dir,
        reviews_csv,
        tmp_path / "run",
        adapter=adalora,
        train={"steps": 8, "eval_every": 1, "lr": 0.05},
    )
    lines: list[str] = []
    result = runner.train_run(config, log=lines.append)
    assert result.ok and "test" in result.metrics
    fell_back = [line for line in lines if "no longer fits" in line]
    assert result.metrics["weights"] == ("final" if fell_back else "best")
    assert fell_back, "the scenario did not arise: best/ should predate the pruning with this learning rate"
    runner.load_run(result.run_dir)  # the saved adapter loads back


def test_a_config_mistake_found_while_loading_leaves_no_run_behind(
    tiny_model_dir, reviews_csv, tmp_path, monkeypatch
):
    """Issue 19: a bad label column (found with the data) or targets that match nothing (found with the
    model) must not leave a run directory that makes the corrected rerun ask for --resume."""
    out = tmp_path / "runs" / "x"
    bad_column = make_config(
        tiny_model_dir, reviews_csv, out, data={"columns": {"text": "review", "label": "verdict"}}
    )
    with pytest.raises(Exception, match="verdict"):
        runner.train_run(bad_column, log=lambda line: None)
    assert not (out / "config.yaml").exists()
    no_target = make_config(
        tiny_model_dir, reviews_csv, out, adapter={"method": "lora", "target_modules": ["querry"]}
    )
    with pytest.raises(ConfigError, match=r"adapter\.target_modules: target 'querry' matched 0 modules"):
        runner.train_run(no_target, log=lambda line: None)
    assert not (out / "config.yaml").exists()
    assert runner.train_run(make_config(tiny_model_dir, reviews_csv, out), log=lambda line: None).ok
    # a config.yaml alone, as older versions left after such a mistake, is not a run either
    (tmp_path / "old").mkdir()
    dump_config(make_config(tiny_model_dir, reviews_csv, tmp_path / "old"), tmp_path / "old" / "config.yaml")
    assert runner.train_run(
        make_config(tiny_model_dir, reviews_csv, tmp_path / "old"), log=lambda line: None
    ).ok
    # a real run is refused, and the suggested new directory keeps the path as the user wrote it
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"e\.g\. output_dir=runs/x-2\)"):
        runner.train_run(make_config(tiny_model_dir, reviews_csv, out), log=lambda line: None)


@pytest.mark.parametrize("mode", ["attention_off", "all_off"])
def test_base_dropout_is_applied_to_the_base_only_and_recorded(tiny_model_dir, reviews_csv, tmp_path, mode):
    config = make_config(
        tiny_model_dir,
        reviews_csv,
        tmp_path / mode,
        model={"base_dropout": mode},
        train={"steps": 1, "eval_every": 0},
    )
    lines: list[str] = []
    result = runner.train_run(config, log=lines.append)
    recorded = result.metrics["base_dropout"]
    assert recorded["mode"] == mode and recorded["attention_zeroed"] == 2  # the tiny BERT's 2 layers
    assert (recorded["other_zeroed"] > 0) == (mode == "all_off")
    assert any(line.startswith(f"base dropout {mode}") for line in lines)
    saved = json.loads((tmp_path / mode / "metrics.json").read_text())
    assert saved["base_dropout"] == recorded


def test_a_bad_auto_precision_setting_stops_the_run_before_anything_is_written(
    tiny_model_dir, reviews_csv, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    monkeypatch.setenv("PEFTKIT_AUTO_PRECISION", "fast")
    with pytest.raises(ConfigError, match=r"PEFTKIT_AUTO_PRECISION is 'fast': set it to fp32 or bf16"):
        runner.train_run(make_config(tiny_model_dir, reviews_csv, out), log=lambda line: None)
    assert not out.exists()

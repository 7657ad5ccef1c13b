"""``adapter.target_modules: auto`` and ``peftkit select`` through run configs, on every task: text
classification (tiny BERT, CSV), causal LM (tiny Llama), seq2seq (tiny T5) and image classification
(the bundled EfficientNet-Lite0 on Fashion-MNIST)."""

from __future__ import annotations

import json

import pytest
import yaml

from peftkit.cli import main
from peftkit.errors import ConfigError
from peftkit.run import runner
from peftkit.run.config import dump_config, parse_config
from peftkit.select import parse_budget
from support.generation import llama_with_pairs, t5_with_pairs
from support.images import needs_efficientnet, needs_fashion
from support.runs import make_config

AUTO = {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": "auto"}
QUIET = {"log": lambda line: None}


def _check_run(result, budget: int) -> dict:
    run_dir = result.run_dir
    assert result.ok, result.metrics.get("stop_reason")
    record = json.loads((run_dir / "selection" / "selection.json").read_text())
    assert (run_dir / "selection" / "selection.md").is_file() and (
        run_dir / "selection" / "selection.png"
    ).stat().st_size
    saved = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == sorted(record["adapter"]["target_modules"])
    sel = result.metrics["selection"]
    assert (
        sel["budget"] == budget
        and 0 < sel["used"] <= budget
        and sel["modules"] == len(saved["target_modules"])
    )
    return record


def test_text_classification_run_selects_then_trains_and_resume_reuses_the_choice(
    tiny_model_dir, reviews_csv, tmp_path
):  # noqa: F811
    config = make_config(tiny_model_dir, reviews_csv, tmp_path / "run", adapter=AUTO, select={"budget": 600})
    result = runner.train_run(config, **QUIET)
    record = _check_run(result, 600)
    assert "classifier" in record["always_trained"]
    assert result.metrics["test"]["accuracy"] >= 0  # evaluated with the chosen adapter
    loaded = runner.load_run(result.run_dir)  # rebuilt from adapter_config.json: no probe needed
    assert loaded.model is not None
    # a resumed run must not probe again (the probe's batches would come from the same seed anyway)
    lines: list[str] = []
    (result.run_dir / "checkpoints").mkdir(exist_ok=True)
    runner.train_run(config, resume=True, log=lines.append)
    assert any("reusing the selection" in line for line in lines)


def test_select_command_writes_a_config_that_trains_as_it_is(tiny_model_dir, reviews_csv, tmp_path, capsys):  # noqa: F811
    config = make_config(tiny_model_dir, reviews_csv, tmp_path / "run")
    path = tmp_path / "config.yaml"
    dump_config(config, path)
    out = tmp_path / "sel"
    assert main(["select", str(path), "--budget", "0.5%", "--score", "fisher", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "selected" in text and "selected.yaml" in text
    chosen = yaml.safe_load((out / "selected.yaml").read_text())
    assert chosen["adapter"]["target_modules"] and chosen["output_dir"].endswith("run-auto")
    record = json.loads((out / "selection.json").read_text())
    assert record["rule"] == "fisher" and record["used"] <= record["budget"]
    assert "| module |" in (out / "selection.md").read_text()
    assert main(["train", str(out / "selected.yaml")]) == 0


def test_gradient_init_through_a_run_and_through_the_select_command(
    tiny_model_dir, reviews_csv, tmp_path, capsys
):  # noqa: F811
    lines: list[str] = []
    config = make_config(
        tiny_model_dir,
        reviews_csv,
        tmp_path / "run",
        adapter=AUTO,
        select={"budget": 600, "init": "gradient"},
    )
    result = runner.train_run(config, log=lines.append)
    record = _check_run(result, 600)
    assert record["init"] == "gradient directions"
    assert (result.run_dir / "selection" / "init.safetensors").is_file()
    assert any(
        line.startswith(f"LoRA A of {result.metrics['selection']['modules']} modules starts along")
        for line in lines
    )
    # peftkit select: the directions go beside selected.yaml, which names them
    path = tmp_path / "config.yaml"
    dump_config(make_config(tiny_model_dir, reviews_csv, tmp_path / "plain"), path)
    out = tmp_path / "sel"
    assert main(["select", str(path), "select.init=gradient", "--budget", "600", "--out", str(out)]) == 0
    chosen = yaml.safe_load((out / "selected.yaml").read_text())
    assert chosen["select"]["init_from"] == str(out / "init.safetensors")
    capsys.readouterr()
    assert main(["train", str(out / "selected.yaml")]) == 0
    assert f"starts along the gradient directions from {out / 'init.safetensors'}" in capsys.readouterr().out
    # a missing file is named with where it comes from, before anything is written
    (out / "init.safetensors").unlink()
    chosen["output_dir"] = str(tmp_path / "again")
    (out / "again.yaml").write_text(yaml.safe_dump(chosen))
    assert main(["train", str(out / "again.yaml")]) == 2 and not (tmp_path / "again").exists()
    assert "init.safetensors that `peftkit select` writes" in capsys.readouterr().err


def test_select_command_without_a_budget_says_how_to_give_one(tiny_model_dir, reviews_csv, tmp_path, capsys):  # noqa: F811
    path = tmp_path / "config.yaml"
    dump_config(make_config(tiny_model_dir, reviews_csv, tmp_path / "run"), path)
    assert main(["select", str(path)]) == 2
    assert "--budget 0.5%" in capsys.readouterr().err
    dump_config(make_config(tiny_model_dir, reviews_csv, tmp_path / "run", adapter={"method": "ia3"}), path)
    assert main(["select", str(path), "--budget", "1000"]) == 2
    assert "set adapter.method=lora" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"adapter": AUTO}, "select.budget: `adapter.target_modules: auto` needs a parameter budget"),
        (
            {"adapter": {"method": "ia3", "target_modules": "auto"}, "select": {"budget": 100}},
            "needs method: lora",
        ),
        ({"adapter": AUTO, "select": {"budget": 0.01}}, "select.budget"),
        ({"adapter": AUTO, "select": {"budget": "lots"}}, "'0.5%', or a count"),
        (
            {"adapter": AUTO, "select": {"budget": 100, "score": "vibes"}},
            "select.score: expected one of gradient",
        ),
        ({"adapter": AUTO, "select": {"budget": 100, "min_rank": 4, "max_rank": 2}}, "min_rank <= max_rank"),
        ({"adapter": {**AUTO, "r": 0}, "select": {"budget": 100}}, "adapter.r: must be a positive integer"),
        (
            {"adapter": AUTO, "select": {"budget": 100, "init": "svd"}},
            "select.init: expected one of gradient, random",
        ),
        (
            {"adapter": AUTO, "select": {"budget": 100, "init_from": "x.safetensors"}},
            "select.init_from: a run that selects .* starts from its own probe's directions",
        ),
        (
            {"adapter": {"method": "ia3"}, "select": {"init_from": "x.safetensors"}},
            "need adapter.method=lora, got 'ia3'",
        ),
    ],
)
def test_bad_selection_configs_are_refused_with_the_fix(
    tiny_model_dir, reviews_csv, tmp_path, changes, message
):  # noqa: F811
    with pytest.raises(ConfigError, match=message):
        make_config(tiny_model_dir, reviews_csv, tmp_path / "run", **changes)


def test_causal_lm_run_selects_targets(tmp_path):
    model_dir, pairs = llama_with_pairs(tmp_path)
    config = parse_config(
        {
            "task": "causal-lm",
            "model": {"name_or_path": str(model_dir)},
            "data": {"files": str(pairs), "max_length": 32, "split": {"validation": 0.2, "test": 0.2}},
            "adapter": AUTO,
            "select": {"budget": "2%", "probe_batches": 2},
            "train": {
                "steps": 3,
                "batch_size": 4,
                "lr": 5e-3,
                "eval_every": 3,
                "metric": "loss",
                "progress": False,
                "tensorboard": False,
                "device": "cpu",
            },
            "eval": {"batch_size": 4, "max_new_tokens": 4},
            "output_dir": str(tmp_path / "run"),
        }
    )
    total = sum(p.numel() for p in runner.build_task(config).load_model().parameters())
    record = _check_run(runner.train_run(config, **QUIET), parse_budget("2%", total))
    assert record["always_trained"] == []  # a language model has no fresh head


def test_seq2seq_run_selects_targets(tmp_path):
    model_dir, pairs = t5_with_pairs(tmp_path)
    config = parse_config(
        {
            "task": "seq2seq",
            "model": {"name_or_path": str(model_dir)},
            "data": {"files": str(pairs), "max_length": 32, "split": {"validation": 0.2, "test": 0.2}},
            "adapter": AUTO,
            "select": {"budget": 3000, "probe_batches": 2, "score": "activation"},
            "train": {
                "steps": 3,
                "batch_size": 4,
                "lr": 5e-3,
                "eval_every": 3,
                "metric": "loss",
                "progress": False,
                "tensorboard": False,
                "device": "cpu",
            },
            "eval": {"batch_size": 4, "max_new_tokens": 4},
            "output_dir": str(tmp_path / "run"),
        }
    )
    _check_run(runner.train_run(config, **QUIET), 3000)


@pytest.mark.slow
@needs_fashion
@needs_efficientnet
def test_image_classification_run_selects_convolutions_and_norms(tmp_path):
    config = parse_config(
        {
            "task": "image-classification",
            "model": {"name_or_path": "efficientnet-lite0"},
            "data": {
                "name": "fashion_mnist",
                "image_size": 32,
                "max_train_examples": 64,
                "max_eval_examples": 16,
            },
            "adapter": AUTO,
            "select": {"budget": "0.5%", "probe_batches": 2, "whole_params": True},
            "train": {
                "steps": 2,
                "batch_size": 8,
                "lr": 5e-3,
                "eval_every": 2,
                "metric": "accuracy",
                "greater_is_better": True,
                "progress": False,
                "tensorboard": False,
                "device": "cpu",
            },
            "eval": {"batch_size": 8},
            "output_dir": str(tmp_path / "run"),
        }
    )
    result = runner.train_run(config, **QUIET)
    record = json.loads((result.run_dir / "selection" / "selection.json").read_text())
    assert record["always_trained"] == ["_fc"]  # the task's fresh head, outside the budget
    kinds = {row["kind"] for row in record["low_rank"] if row["rank"]}
    assert kinds and all("Conv" in kind for kind in kinds)  # the head is the only linear layer
    assert any("BatchNorm" in row["kind"] for row in record["whole"])
    assert result.ok and 0 < result.metrics["selection"]["used"] <= result.metrics["selection"]["budget"]


def test_selected_yaml_trains_from_any_working_directory(tiny_model_dir, reviews_csv, tmp_path, monkeypatch):  # noqa: F811
    """Issue 19: `peftkit select --out sel` (a relative path) once wrote init_from relative to where it ran."""
    path = tmp_path / "config.yaml"
    dump_config(make_config(tiny_model_dir, reviews_csv, tmp_path / "plain"), path)
    monkeypatch.chdir(tmp_path)
    assert main(["select", str(path), "select.init=gradient", "--budget", "600", "--out", "sel"]) == 0
    chosen = yaml.safe_load((tmp_path / "sel" / "selected.yaml").read_text())
    assert chosen["select"]["init_from"] == str((tmp_path / "sel" / "init.safetensors").resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["train", str(tmp_path / "sel" / "selected.yaml")]) == 0
